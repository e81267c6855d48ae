"""Attention inspection, one module per concern: `selection` (what to return, checked against the model and the
limits; the capture pass itself runs on the engine's thread: `Engine.capture`), `maps` (aggregation, rollout, statistics,
sparsification), `encoding` (JSON rows and base64 arrays), `tokens` (token views and spans), `render` (PNG) and
`streaming` (the rows /v1/generate streams). Torch and numpy only; the routes translate to and from HTTP."""
