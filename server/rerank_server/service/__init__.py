"""The data plane: requests in the server's own types, rows to the models' schedulers, results out."""
