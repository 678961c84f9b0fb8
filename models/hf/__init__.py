"""transformers internals behind the `hf` engine: the continuous-batching decoder (decode.py), sampling
and greedy generation on it (sampling.py), the judge's and implicit reward's teacher-forced scoring
(scoring.py), and the plain implementations those are checked and measured against (reference.py).
Only models/engines/hf.py calls into this package from the stages."""
