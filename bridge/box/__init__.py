"""The box: supervisor of many cells, the generated Kamailio front, the box-wide API.
May import: bridge.core, bridge.records, bridge.api, sip.uri; never a cell's internals (cells are processes)."""
