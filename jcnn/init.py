"""Weight initializers with the jax.nn.initializers signature ``(key, shape, dtype) -> array``."""
