"""The gRPC edge: the only code that sees protobuf objects."""
