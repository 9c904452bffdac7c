"""A set of JSON schemas for structured-output tests and the schema benchmark: (name, what to ask for, schema).

They cover what users send as OpenAI `response_format` json_schema with strict: nested objects, arrays with
min/max items, enums and consts, anyOf, $ref/$defs, string patterns, formats and lengths, numbers with bounds,
and additionalProperties false. Strings and arrays are bounded so a small model's answer ends in a few hundred
tokens.
"""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
CLOSED = {"additionalProperties": False}


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            **CLOSED, **extra}


SCHEMAS: list[tuple[str, str, dict]] = [
    ("person", "A person with a name and an age.", obj({"name": NAME, "age": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 120}})),
    ("city", "A city and its country.", obj({"city": NAME, "country": NAME})),
    ("boolean", "Is water wet? Answer as JSON.", obj({"answer": {"type": "boolean"}})),
    ("number_bounds", "A temperature in Celsius.", obj({"celsius": {"type": "number", "minimum": -50,
                                                                      "maximum": 60}})),
    ("exclusive_bounds", "A probability.", obj({"p": {"type": "number", "exclusiveMinimum": 0,
                                                      "exclusiveMaximum": 1}})),
    ("integer_multiple", "An even number of apples.", obj({"apples": {"type": "integer", "multipleOf": 2,
                                                                      "minimum": 0, "maximum": 100}})),
    ("enum", "A primary colour.", obj({"colour": {"enum": ["red", "green", "blue"]}})),
    ("const", "A version-1 record.", obj({"version": {"const": 1}, "title": NAME})),
    ("string_enum_array", "Two to three weekdays.", obj({"days": {
        "type": "array", "items": {"enum": ["mon", "tue", "wed", "thu", "fri"]}, "minItems": 2, "maxItems": 3}})),
    ("int_array", "Three small numbers.", obj({"numbers": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                       "maximum": 9},
                                                           "minItems": 3, "maxItems": 3}})),
    ("enum_of_numbers", "A dice roll.", obj({"roll": {"enum": [1, 2, 3, 4, 5, 6]}})),
    ("nested", "A book with an author.", obj({"title": NAME, "author": obj({"first": NAME, "last": NAME})})),
    ("deep_nested", "A company's address.", obj({"company": obj({"name": NAME, "address": obj({
        "street": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})})),
    ("array_of_objects", "Two products with prices.", obj({"products": {"type": "array", "minItems": 1, "maxItems": 2,
                                                                       "items": obj({"name": NAME, "price": {
                                                                           "type": "number", "minimum": 0,
                                                                           "maximum": 1000}})}})),
    ("optional_field", "A user, nickname optional.", obj({"user": NAME, "nickname": NAME}, required=["user"])),
    ("nullable", "A middle name or null.", obj({"middle": {"anyOf": [NAME, {"type": "null"}]}})),
    ("any_of", "An id, as a number or a code.", obj({"id": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 9999}, {"type": "string", "pattern": "^[A-Z]{3}$"}]}})),
    ("one_of_objects", "A shape: circle or square.", obj({"shape": {"anyOf": [
        obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0, "maximum": 10}}),
        obj({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0, "maximum": 10}})]}})),
    ("ref_defs", "Two points.", {"$defs": {"point": obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                         "y": {"type": "integer", "minimum": -9, "maximum": 9}})},
                                 **obj({"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}})}),
    ("ref_array", "A list of tags.", {"$defs": {"tag": {"type": "string", "pattern": "^[a-z]{2,8}$"}},
                                      **obj({"tags": {"type": "array", "items": {"$ref": "#/$defs/tag"},
                                                      "minItems": 1, "maxItems": 3}})}),
    ("pattern", "A hex colour.", obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}})),
    ("phone_pattern", "A phone number.", obj({"phone": {"type": "string", "pattern": "^\\+?[0-9]{7,12}$"}})),
    ("date_format", "A date.", obj({"date": {"type": "string", "format": "date"}})),
    ("email_format", "An email address.", obj({"email": {"type": "string", "format": "email"}})),
    ("uuid_format", "A UUID.", obj({"id": {"type": "string", "format": "uuid"}})),
    ("time_format", "A meeting time.", obj({"time": {"type": "string", "format": "time"}})),
    ("string_lengths", "A two-letter code.", obj({"code": {"type": "string", "minLength": 2, "maxLength": 2}})),
    ("mixed_types", "A setting.", obj({"key": NAME, "value": {"type": ["string", "integer", "boolean"],
                                                              "maxLength": 12, "minimum": 0, "maximum": 99}})),
    ("matrix", "A 2x2 matrix.", obj({"rows": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}})),
    ("tool_call_like", "Call get_weather for Paris.", obj({"name": {"const": "get_weather"}, "arguments": obj({
        "city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}})})),
    ("event", "An event with a date and attendees.", obj({"event": NAME, "date": {"type": "string", "format": "date"},
                                                          "attendees": {"type": "array", "items": NAME,
                                                                        "minItems": 1, "maxItems": 2}})),
    ("order", "An order of one item.", obj({"order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
                                            "status": {"enum": ["open", "paid", "shipped"]},
                                            "items": {"type": "array", "minItems": 1, "maxItems": 1,
                                                      "items": obj({"sku": {"type": "string",
                                                                            "pattern": "^[A-Z]{2}[0-9]{3}$"},
                                                                    "qty": {"type": "integer", "minimum": 1,
                                                                            "maximum": 9}})}})),
]
