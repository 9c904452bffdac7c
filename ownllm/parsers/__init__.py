"""What turns a model's answer text into structure: reasoning text and tool calls (parsers per format, in
registries chosen from the chat template), and the event stream the API routes render (events.py)."""
