"""The local voice agent: the sans-I/O turn machine, its AgentApp adapter, dialogue, inference hub, chat, REST tools.
May import: bridge.core, bridge.records, media, ai, sip.uri."""
