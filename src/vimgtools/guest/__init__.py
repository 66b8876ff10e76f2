"""Guest layer: one libguestfs appliance over one disk image."""
