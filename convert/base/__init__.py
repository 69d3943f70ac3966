"""The base layer: configs, checkpoint reading and writing, key tables, architecture specs and their registry,
Hub resolution, audio reading. It imports nothing from the models (`flax_model`, `torch_reference`) or from the
application (the rest of `convert`)."""
