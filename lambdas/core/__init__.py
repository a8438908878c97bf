"""The migration domain: shared by the Lambda handlers, the local rehearsal and the tests.

Nothing here reads environment variables or holds global connections: callers pass
connections and clients in.
"""
