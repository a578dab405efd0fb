"""`sfumato serve`: an A1111-compatible HTTP API, a persistent job queue and a web page.

    from sfumato.server.app import ServerConfig, create_app
"""
