"""PAC/WPAD: browsers find the appliance by themselves.

`pac.render` writes the PAC file from `[pac]` and the listeners (sans-I/O); `pac.document` serves
it with validators and 304s (sans-I/O; the pac listener's HTTP shell is `frontends/admin.py`);
`pac.dns_answer` (sans-I/O) and `pac.dns_server` (gevent, UDP and TCP) answer WPAD over DNS.
Imports `appliance.config` (and the observer for metrics), never the frontends.
"""
