"""One client connection: its state and transitions, the routing of messages, the response ledger, the
proxy's own exchanges on the client's upstream session, start-up, and the I/O shell that drives them."""
