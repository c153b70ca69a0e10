"""Virtual PBX: one fsbridge for many companies (tenants), each with its own retailCRM account.

What is per company lives here, in one place:
    settings.py     `Tenant`: a company's settings, from its `<tenant>.yaml` (or the single-company config)
    attribution.py  which company a FreeSWITCH leg is (its domain, else the DID it came in on)
    company.py      `Company`: a tenant's running objects (CRM client and budget, card queue, history
                    uploader over its share of the outbox, routing lookup, manager statuses, click-to-call)
    registry.py     `Companies`: the running companies by name, clientId and domain; reload
What stays shared (service.py): the event socket, the call tracker, the HTTP listeners, the recordings,
the outbox file.
"""
