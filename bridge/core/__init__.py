"""Foundations every part shares: config, logs, metrics, PII masking, schema checks, key ring, backoff, the app base.
May import: the standard library, media, sip.config. Nothing else in bridge."""
