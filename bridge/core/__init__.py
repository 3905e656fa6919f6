"""Shared foundations: config, logs, metrics, PII, schema, key ring, backoff, states, outbound guard, app base.
May import: the standard library, media, sip.config. Nothing else in bridge."""
