"""The OpenAPI 3 document of the HTTP API, built from the same field lists the code checks.

Served at ``/openapi.json``; ``gateway openapi`` writes it, and ``docs/openapi.json`` is
that output (a test keeps them equal).
"""

from __future__ import annotations

from typing import Any

from gateway.intake import ALL_FIELDS
from gateway.rating import ApplicantType

_FIELD_DOCS = {
    "id": "The reporting system's id of the service record (idempotency key). Letters, digits, _ . : - /",
    "kind": "call (a 12345 hotline call) or matter (a government matter, 办件)",
    "completed_at": "ISO 8601 completion time (办结); without an offset it is Beijing time. Empty: not completed yet",
    "mobile": "The citizen's mobile number; stored encrypted, shown masked (SPEC R5.1)",
    "email": "The citizen's e-mail address; stored encrypted",
    "matter_code": "事项编码",
    "matter_name": "事项名称",
    "department_code": "Department (unified social credit code)",
    "department_name": "Department name",
    "agent_id": "Hotline agent or window staff id",
    "work_order": "Hotline work order (工单号)",
    "batch_id": "Batch (批量业务): one rating applies to all records of the batch (SPEC R1.6)",
    "theme_id": "Theme service (主题式一件事) linking several matters (SPEC R1.6)",
    "call_id": "Asterisk unique id of the call",
    "linked_id": "Asterisk linked id of the call",
    "queue": "Hotline queue or skill",
    "applicant_type": "userProp code: " + ", ".join(t.value for t in ApplicantType),
    "area_code": "Administrative division code",
}

_ERROR = {
    "type": "object",
    "required": ["error", "details"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong, in a sentence"},
        "details": {"type": "array", "items": {"type": "object"}},
    },
}


def _error_responses(*codes: int) -> dict[str, Any]:
    text = {
        400: "The request is malformed",
        401: "Missing, unknown or revoked bearer token",
        403: "The token's role may not use this",
        404: "Not found",
        405: "Method not allowed",
        413: "Body or batch too large",
        415: "The body is not application/json",
        422: "The body is JSON but not a valid request",
        503: "A component is down",
    }
    return {
        str(code): {
            "description": text[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code in codes
    }


_QUERY_TEXT = {"type": "string", "minLength": 1, "maxLength": 200}

_CONTACT = {
    "type": "object",
    "required": ["serviceId", "kind", "mobile", "mobileMasked", "audited"],
    "properties": {
        "serviceId": {"type": "string"},
        "kind": {"type": "string"},
        "mobile": {"type": ["string", "null"], "description": "E.164, unmasked; null when none is known"},
        "mobileMasked": {"type": ["string", "null"]},
        "audited": {"type": "boolean", "const": True},
        "recordId": {"type": "string"},
        "level": {"type": "integer", "minimum": 1, "maximum": 5},
    },
}

_REJECTED = {
    "type": "object",
    "required": ["recordId", "recordType", "reason", "attempts", "queuedAt"],
    "properties": {
        "recordId": {"type": "string"},
        "recordType": {"type": "string", "enum": ["evaluation", "case"]},
        "reason": {"type": "string", "description": "The platform's reason"},
        "attempts": {"type": "integer"},
        "queuedAt": {"type": "string", "format": "date-time"},
    },
}

_COUNT_OR_NULL = {"type": ["integer", "null"]}
_RECONCILIATION = {
    "type": "object",
    "required": ["date", "timezone", "rows", "totals", "pending", "rejected", "platform", "consistent"],
    "properties": {
        "date": {"type": "string", "format": "date"},
        "timezone": {"type": "string"},
        "rows": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["pf", "channel", "level", "stored", "pushed", "platform"],
                "properties": {
                    "pf": {"type": "string", "description": "PLATFORM.md channel code"},
                    "channel": {"type": "string"},
                    "level": {"type": "integer"},
                    "levelName": {"type": ["string", "null"]},
                    "stored": {"type": "integer"},
                    "pushed": {"type": "integer"},
                    "platform": _COUNT_OR_NULL,
                },
            },
        },
        "totals": {
            "type": "object",
            "required": ["stored", "pushed", "platform"],
            "properties": {"stored": {"type": "integer"}, "pushed": {"type": "integer"}, "platform": _COUNT_OR_NULL},
        },
        "pending": {"type": "array", "items": {"type": "string"}, "description": "recordIds not yet acknowledged"},
        "rejected": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["recordId", "reason"],
                "properties": {"recordId": {"type": "string"}, "reason": {"type": "string"}},
            },
        },
        "platform": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "not configured", "unavailable"]},
                "error": {"type": ["string", "null"]},
            },
        },
        "consistent": {"type": "boolean"},
    },
}

_HEALTH = {
    "type": "object",
    "required": ["status", "components"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "degraded", "down"], "description": "The worst component's"},
        "components": {
            "type": "object",
            "required": ["store"],
            "additionalProperties": {
                "type": "object",
                "required": ["status"],
                "properties": {"status": {"type": "string", "enum": ["ok", "degraded", "down"]}},
            },
        },
    },
}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _page(name: str, item: dict[str, Any], *, offset: bool = False) -> dict[str, Any]:
    properties: dict[str, Any] = {
        name: {"type": "array", "items": item},
        "limit": {"type": "integer"},
        "nextCursor": {"type": ["string", "null"], "description": "Pass as cursor for the next page; null: last"},
        "next": {"type": ["string", "null"], "description": "The next page's path and query; null: last page"},
    }
    if offset:
        properties["offset"] = {"type": "integer"}
    return {"type": "object", "required": [name, "limit", "nextCursor", "next"], "properties": properties}


def build_openapi() -> dict[str, Any]:
    record_properties: dict[str, Any] = {
        name: {"type": ["string", "null"], "description": _FIELD_DOCS[name]} for name in ALL_FIELDS
    }
    record_properties["id"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": 64,
        "pattern": "^[A-Za-z0-9_.:\\-/]+$",
        "description": _FIELD_DOCS["id"],
    }
    record_properties["kind"] = {"type": "string", "enum": ["call", "matter"], "description": _FIELD_DOCS["kind"]}
    service_record = {
        "type": "object",
        "required": ["id", "kind"],
        "additionalProperties": False,
        "properties": record_properties,
    }
    result = {
        "type": "object",
        "required": ["id", "status", "errors"],
        "properties": {
            "index": {"type": "integer"},
            "id": {"type": ["string", "null"]},
            "status": {"type": "string", "enum": ["created", "updated", "unchanged", "rejected"]},
            "errors": {
                "type": "array",
                "items": {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}},
            },
        },
    }
    rating = {
        "type": "object",
        "required": ["recordId", "level", "levelName", "channel", "isDefault", "isFollowUp", "isAttempt", "ratedAt"],
        "properties": {
            "recordId": {"type": "string", "description": "The rating's stable id (PLATFORM.md recordId)"},
            "level": {
                "type": "integer",
                "minimum": 1,
                "maximum": 5,
                "description": "SPEC R1.2: 5 非常满意 … 1 非常不满意",
            },
            "levelName": {"type": "string"},
            "channel": {"type": "string"},
            "rawInput": {"type": ["string", "null"]},
            "comment": {"type": ["string", "null"]},
            "reasons": {"type": "array", "items": {"type": "string"}},
            "isDefault": {"type": "boolean"},
            "isFollowUp": {"type": "boolean"},
            "isAttempt": {"type": "boolean"},
            "ratedAt": {"type": "string", "format": "date-time"},
            "service": {
                "type": "object",
                "description": "The rated service record; the phone only masked (SPEC R5.1)",
                "properties": {
                    name: {"type": "string"} if name in ("id", "kind") else {"type": ["string", "null"]}
                    for name in (
                        "id",
                        "kind",
                        "callId",
                        "linkedId",
                        "workOrder",
                        "agentId",
                        "matterCode",
                        "departmentCode",
                        "mobileMasked",
                    )
                },
            },
        },
    }
    bearer = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "好差评 evaluation gateway",
            "version": "1.0.0",
            "description": "Service intake, operators' look-ups, supervisors' audited call-back views, "
            "reconciliation, health and metrics. Every /v1 route needs a bearer token "
            "(`gateway token create --role ROLE`). Roles: intake (service systems), operator, supervisor, "
            "platform, admin (SPEC R5.2). Phones are masked (138****5678) everywhere but the call-back views "
            "(SPEC R5.1).",
        },
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "ServiceRecord": service_record,
                "IntakeResult": result,
                "Rating": rating,
                "Contact": _CONTACT,
                "RejectedRecord": _REJECTED,
                "Reconciliation": _RECONCILIATION,
                "Health": _HEALTH,
                "Error": _ERROR,
            },
        },
        "paths": {
            "/health": {
                "get": {
                    "summary": "Health of each component",
                    "description": "The store (asked), and each component this process runs: agi (the FastAGI "
                    "listener), pusher (platform reachability: last success and failure), smsc (the SMPP link). "
                    "A component is ok, degraded (works with a problem that loses nothing, e.g. the platform "
                    "cannot be reached: ratings wait in the outbox) or down.",
                    "responses": {
                        "200": {
                            "description": "No component is down",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        },
                        "503": {
                            "description": "A component is down",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        },
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1 document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/v1/service-records": {
                "post": {
                    "summary": "Report services that happened or were completed (SPEC R1.3)",
                    "description": 'One record, or up to 1000 as {"records": [...]}. Idempotent on each record\'s id: '
                    "a known record is updated with the fields now given; empty fields never erase what is known. "
                    "In a batch each bad record is reported with its index, id and reasons, and never stops the rest.",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/ServiceRecord"},
                                        {
                                            "type": "object",
                                            "required": ["records"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "records": {
                                                    "type": "array",
                                                    "minItems": 1,
                                                    "maxItems": 1000,
                                                    "items": {
                                                        "description": "A ServiceRecord. Any item that is not a "
                                                        "valid one (not even an object) is reported rejected in "
                                                        "results with its index and reasons; the rest are stored"
                                                    },
                                                }
                                            },
                                        },
                                    ]
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "A single record updated or unchanged, or a batch's results",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "oneOf": [
                                            {"$ref": "#/components/schemas/IntakeResult"},
                                            {
                                                "type": "object",
                                                "required": ["counts", "results"],
                                                "properties": {
                                                    "counts": {"type": "object"},
                                                    "results": {
                                                        "type": "array",
                                                        "items": {"$ref": "#/components/schemas/IntakeResult"},
                                                    },
                                                },
                                            },
                                        ]
                                    }
                                }
                            },
                        },
                        "201": {
                            "description": "A single record created",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/IntakeResult"}}},
                        },
                        **_error_responses(400, 401, 403, 413, 415),
                        "422": _json_response(
                            "A single record rejected (its result, with the reasons), or a body that is JSON but "
                            "no service record (an Error)",
                            {
                                "anyOf": [
                                    {"$ref": "#/components/schemas/IntakeResult"},
                                    {"$ref": "#/components/schemas/Error"},
                                ]
                            },
                        ),
                    },
                }
            },
            "/v1/service-records/{id}": {
                "get": {
                    "summary": "One service record, personal data masked",
                    "security": bearer,
                    "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {
                            "description": "The record",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_error_responses(401, 403, 404),
                    },
                }
            },
            "/v1/service-records/{id}/contact": {
                "get": {
                    "summary": "Call-back view of a service record: the citizen's phone unmasked (supervisors)",
                    "description": "SPEC R4.1, R5.1: only the supervisor role; every view is written to the audit "
                    "log (who, which record; never the number) before the number is answered.",
                    "security": bearer,
                    "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": _json_response("The contact, audited", {"$ref": "#/components/schemas/Contact"}),
                        **_error_responses(400, 401, 403, 404),
                    },
                }
            },
            "/v1/ratings": {
                "get": {
                    "summary": "Ratings by call, linked id, work order, agent, matter, department, service record "
                    "or time (operators)",
                    "description": "Every filter given must match; at least one filter, from or to. Oldest first. "
                    "Paged: follow `next` (or pass `nextCursor` as `cursor`) until it is null; a cursor page never "
                    "repeats or skips a rating when new ones arrive. `offset` is kept for small jumps. Phones are "
                    "masked (SPEC R5.1).",
                    "security": bearer,
                    "parameters": [
                        {"name": name, "in": "query", "required": False, "schema": schema, "description": doc}
                        for name, schema, doc in (
                            ("call_id", _QUERY_TEXT, "Asterisk unique id"),
                            ("linked_id", _QUERY_TEXT, "Asterisk linked id"),
                            ("work_order", _QUERY_TEXT, "Hotline work order (工单号)"),
                            ("agent", _QUERY_TEXT, "Agent or window staff id"),
                            ("matter", _QUERY_TEXT, "Matter code (事项编码)"),
                            ("department", _QUERY_TEXT, "Department code"),
                            ("service_id", _QUERY_TEXT, "Service record id"),
                            (
                                "from",
                                {"type": "string"},
                                "ISO 8601 time or date (inclusive); Beijing time if no offset",
                            ),
                            ("to", {"type": "string"}, "ISO 8601 time (exclusive) or date (inclusive)"),
                            ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "Page size (default 100)"),
                            ("cursor", _QUERY_TEXT, "The nextCursor of the page before"),
                            ("offset", {"type": "integer", "minimum": 0, "maximum": 1000000}, "Rows to skip"),
                        )
                    ],
                    "responses": {
                        "200": _json_response(
                            "Matching ratings, oldest first",
                            _page("ratings", {"$ref": "#/components/schemas/Rating"}, offset=True),
                        ),
                        **_error_responses(400, 401, 403),
                    },
                }
            },
            "/v1/ratings/{recordId}/contact": {
                "get": {
                    "summary": "Call-back view of a rating: the citizen's phone unmasked (supervisors)",
                    "description": "SPEC R4.1, R5.1: only the supervisor role; every view is written to the audit "
                    "log (who, which rating; never the number) before the number is answered.",
                    "security": bearer,
                    "parameters": [{"name": "recordId", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": _json_response("The contact, audited", {"$ref": "#/components/schemas/Contact"}),
                        **_error_responses(400, 401, 403, 404),
                    },
                }
            },
            "/v1/outbox/rejected": {
                "get": {
                    "summary": "Records the central platform rejected as invalid, with its reason (admins)",
                    "description": "SPEC R7.2: set aside, never retried unchanged. Paged like /v1/ratings.",
                    "security": bearer,
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {"name": "cursor", "in": "query", "schema": _QUERY_TEXT},
                    ],
                    "responses": {
                        "200": _json_response(
                            "Rejected records, oldest first",
                            _page("rejected", {"$ref": "#/components/schemas/RejectedRecord"}),
                        ),
                        **_error_responses(400, 401, 403),
                    },
                }
            },
            "/v1/reconciliation": {
                "get": {
                    "summary": "A day's totals per channel and level: stored, pushed, and the platform's",
                    "description": "SPEC R7.3 (roles admin, supervisor, platform). The day is the assessTime date "
                    "in Asia/Shanghai. The platform is asked for its counts when [platform] is configured; "
                    "`platform.status` says whether it answered. Same figures as `gateway reconcile --json`.",
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "date",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string", "format": "date"},
                            "description": "YYYY-MM-DD",
                        }
                    ],
                    "responses": {
                        "200": _json_response("The day compared", {"$ref": "#/components/schemas/Reconciliation"}),
                        **_error_responses(400, 401, 403),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text exposition format)",
                    "description": "Without a token from loopback only; from elsewhere with an admin or platform "
                    "token. See docs/operations.md for the list.",
                    "security": [{}, {"bearer": []}],
                    "responses": {
                        "200": {
                            "description": "The metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_error_responses(400, 401, 403),
                    },
                }
            },
        },
    }
