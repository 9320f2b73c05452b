"""The CPU speed kernels of the fast engine: hand-written backward passes (``lstm``, ``feedloop``,
``bahdanauloop``, ``scores``, ``losses``), weights cast and packed once (``steplinear``), matmul
shapes that repeat (``shapes``), a cheaper dropout mask (``dropout``), the fused Adam step
(``adam``), the allocator setting for search (``heap``), and the guards around the private torch
APIs they use (``compat``).

Imports only torch, the standard library and itself: kernels work on tensors and nn.LSTM
parameters, never on the model's types. ``seq2seq.model.fast`` binds them to the model; each has
parity tests against the reference model (tests/test_model.py, tests/test_one_node_loops.py, ...)."""
