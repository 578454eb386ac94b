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
        "properties": {
            "recordId": {"type": "string"},
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
            "service": {"type": "object"},
        },
    }
    bearer = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "好差评 evaluation gateway",
            "version": "1.0.0",
            "description": "Service intake and operators' look-ups. Every /v1 route needs a bearer token "
            "(`gateway token create --role ROLE`). Roles: intake (service systems), operator, supervisor, "
            "platform, admin (SPEC R5.2).",
        },
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"ServiceRecord": service_record, "IntakeResult": result, "Rating": rating, "Error": _ERROR},
        },
        "paths": {
            "/health": {
                "get": {
                    "summary": "Health of each component",
                    "responses": {
                        "200": {
                            "description": "All components work",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_error_responses(503),
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
                                                    "items": {"type": "object"},
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
                        **_error_responses(400, 401, 403, 413, 415, 422),
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
            "/v1/ratings": {
                "get": {
                    "summary": "Ratings linked to a call, work order, agent or service record (operators)",
                    "security": bearer,
                    "parameters": [
                        {"name": name, "in": "query", "required": False, "schema": schema, "description": doc}
                        for name, schema, doc in (
                            ("call_id", {"type": "string"}, "Asterisk unique id"),
                            ("linked_id", {"type": "string"}, "Asterisk linked id"),
                            ("work_order", {"type": "string"}, "Hotline work order"),
                            ("agent", {"type": "string"}, "Agent id"),
                            ("service_id", {"type": "string"}, "Service record id"),
                            ("from", {"type": "string"}, "ISO 8601 time or date (inclusive)"),
                            ("to", {"type": "string"}, "ISO 8601 time (exclusive) or date (inclusive)"),
                            ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "Page size"),
                            ("offset", {"type": "integer", "minimum": 0}, "Page start"),
                        )
                    ],
                    "responses": {
                        "200": {
                            "description": "Matching ratings, oldest first",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "ratings": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Rating"},
                                            },
                                            "limit": {"type": "integer"},
                                            "offset": {"type": "integer"},
                                        },
                                    }
                                }
                            },
                        },
                        **_error_responses(400, 401, 403),
                    },
                }
            },
        },
    }
