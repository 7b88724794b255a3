"""render_wire: the wire layer the client and the server share.

The generated protobuf code (`pb`) and the one conversion between its messages
and Python values, split by message: `requests` (every request, both
directions), `samples` (every answer: samples, tokens, parsed responses, stream
results), `tensors` (MultiModalData and its arrays; `compact` for pixel
tensors), `models` (ListModels). Beneath them: `types` (the Python values),
`errors` (one exception per gRPC status), `jsonvalue`, `media`, `wireformat`.
Needs only grpcio, protobuf and numpy.
"""
