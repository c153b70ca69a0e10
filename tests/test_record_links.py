"""Record links (signing, parsing) and the recordings directory (lookup, MP3 conversion)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from fsbridge.record_links import RecordLinks, parse_path, redact_path, valid_record_id
from fsbridge.recordings import Recordings, to_mp3

REC_ID = "31ff8abf-a4ac-4f83-a050-5a0db45e0c55"
OTHER_ID = "95bf58e2-2fa0-4370-8553-0d97a378255b"
SECRET = "s3cret-s3cret-s3cret-s3cret-0123"


def sig_of(url: str) -> str:
    return urlsplit(url).path.split("/")[2]


# --- links -------------------------------------------------------------------------------------------


def test_url_shape_and_verify() -> None:
    links = RecordLinks("https://pbx.example.com/fsbridge/", SECRET)
    url = links.url(REC_ID)
    parts = urlsplit(url)
    assert parts.scheme == "https" and parts.netloc == "pbx.example.com"
    assert parts.query == ""
    prefix, records, sig, filename = parts.path.rsplit("/", 3)
    assert (prefix, records, filename) == ("/fsbridge", "records", f"{REC_ID}.wav")
    assert len(sig) == 22 and all(c.isalnum() or c in "-_" for c in sig)
    assert links.verify(sig, REC_ID, "wav")
    assert url == links.url(REC_ID, "wav")  # deterministic: the same call always gets the same link


def test_verify_rejects_everything_else() -> None:
    links = RecordLinks("https://pbx.example.com", SECRET)
    sig = sig_of(links.url(REC_ID))
    assert not links.verify(sig, OTHER_ID, "wav")
    assert not links.verify(sig, REC_ID, "mp3")
    assert not links.verify(sig[:-1] + ("A" if sig[-1] != "A" else "B"), REC_ID, "wav")
    assert not links.verify(sig[:21], REC_ID, "wav")
    assert not links.verify(sig + "x", REC_ID, "wav")
    assert not links.verify("", REC_ID, "wav")
    assert not links.verify(sig, REC_ID.upper(), "wav")
    assert not links.verify(sig, "../" + REC_ID, "wav")
    assert not links.verify(sig, REC_ID, "txt")
    other = RecordLinks("https://pbx.example.com", "another-secret-another-secret")
    assert not other.verify(sig, REC_ID, "wav")


def test_previous_secret_keeps_old_links_valid() -> None:
    old = RecordLinks("https://pbx.example.com", "old-secret-old-secret-old")
    new = RecordLinks("https://pbx.example.com", SECRET, previous_secrets=["old-secret-old-secret-old"])
    old_sig = sig_of(old.url(REC_ID))
    assert new.verify(old_sig, REC_ID, "wav")
    assert sig_of(new.url(REC_ID)) != old_sig  # new links use the new secret
    assert not RecordLinks("https://pbx.example.com", SECRET).verify(old_sig, REC_ID, "wav")


@pytest.mark.parametrize("bad", ["", "../etc/passwd", REC_ID.upper(), REC_ID + "\n", REC_ID + "0", "x" * 36,
                                 REC_ID.replace("-", ""), "/" + REC_ID])
def test_url_refuses_non_uuid_ids(bad: str) -> None:
    links = RecordLinks("https://pbx.example.com", SECRET)
    with pytest.raises(ValueError):
        links.url(bad)
    assert not valid_record_id(bad)


def test_url_refuses_unknown_format_and_bad_config() -> None:
    with pytest.raises(ValueError):
        RecordLinks("https://pbx.example.com", SECRET).url(REC_ID, "txt")
    with pytest.raises(ValueError):
        RecordLinks("https://pbx.example.com", "short")
    with pytest.raises(ValueError):
        RecordLinks("pbx.example.com", SECRET)


def test_parse_path() -> None:
    links = RecordLinks("https://pbx.example.com", SECRET)
    path = links.path(REC_ID, "mp3")
    ref = parse_path(path)
    assert ref is not None and (ref.record_id, ref.ext) == (REC_ID, "mp3")
    assert links.verify(ref.signature, ref.record_id, ref.ext)
    for bad in ("/records/", f"/records/{REC_ID}.wav", f"/records/a/b/{REC_ID}.wav", f"/records/a/{REC_ID}",
                f"/records/a/{REC_ID}.wav/", f"/records/a/{REC_ID}.wav.mp3", "/records/a/../x.wav",
                f"/other/a/{REC_ID}.wav"):
        assert parse_path(bad) is None, bad


def test_redact_path() -> None:
    path = RecordLinks("https://pbx.example.com", SECRET).path(REC_ID)
    assert redact_path(path) == f"/records/*/{REC_ID}.wav"
    assert redact_path("/retailcrm/status") == "/retailcrm/status"


# --- recordings directory ----------------------------------------------------------------------------


def _served(recs: Recordings, record_id: str, ext: str | None = None) -> tuple[str, str] | None:
    """(format, content type) of what open() gives for `record_id`, or None."""
    rec = recs.open(record_id, ext)
    if rec is None:
        return None
    rec.file.close()
    return rec.ext, rec.content_type


def test_open_prefers_requested_then_configured(tmp_path: Path) -> None:
    (tmp_path / f"{REC_ID}.wav").write_bytes(b"w")
    recs = Recordings(tmp_path)
    assert _served(recs, REC_ID) == ("wav", "audio/wav")
    (tmp_path / f"{REC_ID}.mp3").write_bytes(b"m")
    assert _served(recs, REC_ID) == ("wav", "audio/wav")
    assert _served(Recordings(tmp_path, prefer_mp3=True), REC_ID) == ("mp3", "audio/mpeg")
    assert _served(recs, REC_ID, "mp3") == ("mp3", "audio/mpeg")
    assert _served(recs, OTHER_ID) is None
    assert _served(recs, "../" + REC_ID) is None
    assert recs.wav_path(REC_ID) == tmp_path / f"{REC_ID}.wav"
    with pytest.raises(ValueError):
        recs.wav_path("../x")


def test_open_refuses_directories_fifos_and_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    rec_dir = tmp_path / "rec"
    rec_dir.mkdir()
    (rec_dir / f"{REC_ID}.wav").mkdir()
    os.mkfifo(rec_dir / f"{REC_ID}.mp3")
    (rec_dir / f"{OTHER_ID}.wav").symlink_to(outside)
    recs = Recordings(rec_dir)
    assert recs.open(REC_ID) is None
    assert recs.open(OTHER_ID) is None


# --- MP3 conversion ----------------------------------------------------------------------------------


def _fake_encoder(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f"#!{sys.executable}\nimport sys, time, pathlib\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def wav(tmp_path: Path, fixtures_dir: Path) -> Path:
    rec_dir = tmp_path / "rec"
    rec_dir.mkdir()
    return Path(shutil.copy(fixtures_dir / "recordings" / f"{REC_ID}.wav", rec_dir))


def test_to_mp3_without_encoder_keeps_wav(wav: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert to_mp3(wav) is None
    assert wav.exists()
    assert not wav.with_suffix(".mp3").exists()


def test_to_mp3_with_fake_lame(wav: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    # Records its argv, writes the output file named by its last argument.
    _fake_encoder(bin_dir, "lame", "pathlib.Path(sys.argv[-1] + '.argv').write_text(repr(sys.argv))\n"
                                   "pathlib.Path(sys.argv[-1]).write_bytes(b'ID3' + b'x' * 100)")
    monkeypatch.setenv("PATH", str(bin_dir))
    mp3 = to_mp3(wav, keep_wav=False)
    assert mp3 == wav.with_suffix(".mp3")
    assert mp3.read_bytes().startswith(b"ID3")
    assert not wav.exists()  # keep_wav=False removes it, but only after success
    assert not list(wav.parent.glob("*.part"))
    argv = eval((wav.parent / f"{REC_ID}.mp3.part.argv").read_text())
    assert argv[-2] == str(wav) and argv[-1].endswith(".mp3.part")


def test_to_mp3_argv_is_never_a_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wav: Path) -> None:
    bin_dir = tmp_path / "bin"
    _fake_encoder(bin_dir, "lame", "pathlib.Path(sys.argv[-1]).write_bytes(b'ID3')")
    monkeypatch.setenv("PATH", str(bin_dir))
    hostile = wav.parent / "x; touch PWNED; $(touch PWNED2) -o.wav"
    shutil.copy(wav, hostile)
    monkeypatch.chdir(wav.parent)
    assert to_mp3(hostile) == hostile.with_suffix(".mp3")
    assert not (wav.parent / "PWNED").exists() and not (wav.parent / "PWNED2").exists()


def test_to_mp3_failure_and_timeout_keep_wav(wav: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    _fake_encoder(bin_dir, "lame", "pathlib.Path(sys.argv[-1]).write_bytes(b'half');"
                                   "sys.stderr.write('boom\\n'); sys.exit(2)")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert to_mp3(wav, keep_wav=False) is None
    assert wav.exists() and not wav.with_suffix(".mp3").exists()
    assert not list(wav.parent.glob("*.part"))

    _fake_encoder(bin_dir, "lame", "pathlib.Path(sys.argv[-1]).write_bytes(b'half'); time.sleep(30)")
    assert to_mp3(wav, keep_wav=False, timeout=0.5) is None
    assert wav.exists() and not wav.with_suffix(".mp3").exists()
    assert not list(wav.parent.glob("*.part"))


def test_to_mp3_falls_back_to_ffmpeg(wav: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    _fake_encoder(bin_dir, "ffmpeg", "assert '-f' in sys.argv and 'mp3' in sys.argv\n"
                                     "pathlib.Path(sys.argv[-1]).write_bytes(b'ID3ff')")
    monkeypatch.setenv("PATH", str(bin_dir))
    recs = Recordings(wav.parent, prefer_mp3=True)
    assert recs.to_mp3(wav) == wav.with_suffix(".mp3")
    assert wav.exists()  # keep_wav defaults to True
    assert _served(recs, REC_ID) == ("mp3", "audio/mpeg")


def test_to_mp3_refuses_non_wav(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("x")
    assert to_mp3(tmp_path / "x.txt") is None
    assert to_mp3(tmp_path / "missing.wav") is None
    with pytest.raises(ValueError):
        to_mp3(tmp_path / "x.txt", encoder="sox")


@pytest.mark.skipif(shutil.which("lame") is None, reason="lame is not installed")
def test_to_mp3_with_real_lame(wav: Path) -> None:
    mp3 = to_mp3(wav)
    assert mp3 is not None and mp3.stat().st_size > 1000
    head = mp3.read_bytes()[:3]
    assert head == b"ID3" or head[0] == 0xFF  # an ID3 tag or an MPEG frame sync
    assert mp3.stat().st_size < wav.stat().st_size
    # The MP3 decodes back to about the same duration (~8 s).
    out = subprocess.run(["lame", "--decode", str(mp3), str(wav.with_suffix(".back.wav"))],
                         capture_output=True, timeout=60, check=False)
    assert out.returncode == 0


def test_to_mp3_follows_no_planted_symlink(wav: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_encoder(tmp_path / "bin", "lame", "pathlib.Path(sys.argv[-1]).write_bytes(b'ID3' + b'x' * 100)")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    planted = wav.with_name("0b5f3a57-1111-4222-8333-444455556666.wav")
    planted.symlink_to(outside)
    assert to_mp3(planted) is None  # not encoded into a recording the proxy would serve
    assert not planted.with_suffix(".mp3").exists()
    wav.with_name(f"{REC_ID}.mp3.part").symlink_to(outside)  # the encoder's output name, pointing out
    assert to_mp3(wav) == wav.with_suffix(".mp3")
    assert outside.read_text() == "not yours"
