"""The control API: routes, HTTP server, event bus, webhooks, speakings, streams, console, the Services interface.
May import: bridge.core, bridge.records, media, sip.commands, sip.uri."""
