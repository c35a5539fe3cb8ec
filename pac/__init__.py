"""PAC/WPAD: PAC rendering, HTTP endpoint and DNS responder (arrives with the PAC/WPAD issue)."""
