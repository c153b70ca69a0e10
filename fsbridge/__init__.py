"""fsbridge: FreeSWITCH <-> retailCRM telephony bridge."""

__version__ = "0.1.0"
