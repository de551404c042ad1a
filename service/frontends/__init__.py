"""Protocol bindings: each translates one wire format to the core's requests and back."""
