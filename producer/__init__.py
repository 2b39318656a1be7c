"""vlq: the light side (job schema, SDK client, CLI, HTTP API, folder annotation). No torch."""

__version__ = "0.1.0"
