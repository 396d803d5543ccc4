"""Ray Serve application of raylm: ingress (OpenAI HTTP + gRPC), LLMServer replicas, CLI."""
