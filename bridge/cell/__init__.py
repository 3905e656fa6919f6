"""One cell: engine wiring, sessions, apps, the 20 ms tick, and the services it offers the API.
May import: bridge.core, bridge.records, bridge.agent, bridge.api, sip, media, ai."""
