"""apollo_ray: Apollo progressive training on Ray."""
