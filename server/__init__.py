"""dreamstream's server: many sessions of one pipeline on one device, over WebSocket."""
