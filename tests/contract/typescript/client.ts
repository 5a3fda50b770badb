// Type-checked against the types openapi-typescript generates from the public document
// (tests/contract/test_typescript_client.py): a schema that stops saying these things breaks the build.
import type { components, paths } from "./api";

type Problem = components["schemas"]["Problem"];
type OrderConflict = components["schemas"]["OrderConflictProblem"];
type Retry = components["schemas"]["RetryProblem"];
type Order = components["schemas"]["OrderRead"];
type User = components["schemas"]["UserRead"];
type Place = paths["/api/v1/orders"]["post"];

export function describe(p: Problem): string {
  return `${p.status} ${p.title}: ${p.detail} (${p.request_id ?? "no request id"})`;
}

export function shortItems(p: OrderConflict): string[] {
  return (p.short_items ?? []).map((s) => `${s.product_id}: ${s.requested} asked, ${s.available} left`);
}

export function retryIn(p: Retry): number {
  return p.retry_after ?? 1;
}

export function statusOf(o: Order): "pending" | "confirmed" | "shipped" | "delivered" | "cancelled" | "expired" {
  return o.status;
}

export function isStaff(u: User): boolean {
  const role: "customer" | "staff" | "admin" = u.role;
  return role !== "customer";
}

// The Idempotency-Key header is required: a request without it does not type-check.
export const placing: Place["parameters"]["header"] = { "Idempotency-Key": "9b2f6c1e-order-1" };

export type Created = Place["responses"][201]["content"]["application/json"];
export type Conflict = Place["responses"][409]["content"]["application/problem+json"];
export type FieldLocation = Place["responses"][422]["content"]["application/problem+json"]["errors"][number]["loc"];
export type Throttled = Place["responses"][429]["content"]["application/problem+json"];
export const quantity: components["schemas"]["OrderLineIn"]["quantity"] = 2;
