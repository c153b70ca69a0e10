# SIPp (Debian's sip-tester) with the scenarios of tests/sip, for trying calls against the demo.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends sip-tester \
 && rm -rf /var/lib/apt/lists/*
COPY tests/sip /sip
WORKDIR /sip
ENTRYPOINT ["sipp"]
