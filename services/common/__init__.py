"""Parts shared by every cfrseg service: settings, server factory (auth, TLS, health, graceful stop), the S3
store, error mapping, logging, the Redis-backed job store and the generic stage servicer."""
