"""The PostgreSQL v3 wire codec, sans-IO: frames, messages, bound parameter values. Never imports asyncio."""
