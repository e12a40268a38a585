"""Pure tensor functions: no nn.Module, no config objects, no I/O."""
