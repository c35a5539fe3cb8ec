"""On-the-fly CA: create/load the CA, mint and cache leaf certificates (arrives with the HTTPS issue)."""
