"""One client connection: its phase and transitions (state), the routing table (router), the response ledger,
the decisions and what they leave behind (decisions), the proxy's own traffic and exchanges on the client's
upstream session (traffic, exchange), start-up, the sans-IO core joining them (core), and the I/O shell (shell)."""
