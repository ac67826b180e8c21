"""What the server, the edge and the client share: settings rules, defaults, summary statistics.

Shipped by tokenwire-client (which the server distribution depends on) and importable by every
other package; it imports none of them (an import-linter contract checks it).
"""
