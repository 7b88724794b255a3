"""render_server: serves renderers.build_training_sample over gRPC (see ARCHITECTURE.md)."""
