"""Drop-in recipes: one technique a file, each copied alone into a Keras project.

A file here imports the standard library, keras and numpy (tensorflow, PIL or
psutil only where the technique is theirs; tf_keras and tfmot only inside the
functions that need them), never this repository: tests/test_dropin.py checks
that. The measured experiment around each file lives in experiments/.
"""
