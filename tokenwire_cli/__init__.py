"""The `tokenwire` command: composes the server (service) and the clients (clients)."""
