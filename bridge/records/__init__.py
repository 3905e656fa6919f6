"""What is kept: the SQLite store, the JSONL call/turn journals, recordings (live recorders, sealing), the durable writer.
May import: bridge.core, media, sip.uri."""
