"""One small router per surface; handlers only translate between the wire and the engine."""
