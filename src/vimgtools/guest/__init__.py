"""Guest layer: the Guest protocol, GuestImage (libguestfs) and FakeGuest (tests), facts, typed steps."""
