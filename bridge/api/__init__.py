"""The control API: routes, HTTP server, event bus, webhooks, speakings/transcribes, media streams, console.
May import: bridge.core, bridge.records, media, sip.commands, sip.uri."""
