"""Training: losses, the jitted step and loop (`train`), the workdir (`checkpoint`), the
all-exits pass and its cache (`evaluate`), TensorBoard curves (`summary`)."""
