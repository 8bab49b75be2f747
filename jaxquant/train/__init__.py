"""Training the small models jaxquant ships (optax, EMA, orbax resume, progress bar)."""
