"""Generated gRPC code for the project's own protos (protos/), written here at build time."""
