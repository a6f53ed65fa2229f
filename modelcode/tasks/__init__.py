"""What `modelcode.load` wraps a model in when it is not a causal LM: one class per task, each with
`from_folder(model, config, folder)` reading what else the task needs from the checkpoint folder."""
