"""stepstream's web page: a gateway over the SDK (`stepstream web`) serving a
jobs list and a live job page, updated by Server-Sent Events whose ids are
revisions. It is a client like any other: it reads the status service through
stepstream_client only, and shows what that service says."""
