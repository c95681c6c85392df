// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * kmesh-plugin datapath: cgroup connect4/connect6 programs that rewrite a connect() to a
 * Service's ClusterIP:port into one endpoint, chosen by locality tier, before any packet leaves.
 *
 * Per connect: frontend lookup -> active set -> record -> first non-empty tier (tier 0 only in
 * strict mode) -> uniform random slot in that tier -> rewrite address and port. A frontend with
 * no eligible endpoint refuses the connect with ECONNREFUSED; it never falls through to the
 * ClusterIP, and neither does a ClusterIP on a port it does not serve. Every other destination
 * passes untouched. In enrolment mode CNI, a socket whose network namespace the chained CNI
 * plugin did not enrol is not ours: every connect of it passes untouched, ClusterIPs included.
 */
#include <linux/bpf.h>
#include <linux/errno.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "kmesh_lb.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Verdicts of kmesh_pick(). */
#define KMESH_PASS 0    /* not a frontend: leave the connect alone */
#define KMESH_REWRITE 1 /* endpoint chosen: rewrite the destination */
#define KMESH_REFUSE 2  /* a ClusterIP without an eligible endpoint */

/* Return values of a cgroup sock_addr program. */
#define SOCK_ADDR_ALLOW 1
#define SOCK_ADDR_REJECT 0

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_SERVICES);
	__type(key, struct kmesh_frontend_key);
	__type(value, struct kmesh_frontend);
} kmesh_frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_SERVICES);
	__type(key, struct kmesh_vip);
	__type(value, __u8);
} kmesh_vips SEC(".maps");

/* The active set (0 or 1) of each service group. An array, so a flip is an in-place store of
 * a value whose only changing byte is the lowest: a reader sees either the old or the new set,
 * never a torn mixture (a hash update could recycle the element under a reader). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KMESH_MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u32);
} kmesh_active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KMESH_MAX_SERVICES * KMESH_SETS);
	__type(key, __u32);
	__type(value, struct kmesh_record);
} kmesh_records SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_ENDPOINTS);
	__type(key, struct kmesh_slot_key);
	__type(value, struct kmesh_endpoint);
} kmesh_slots SEC(".maps");

/* An array indexed by sid: one direct lookup per connect (a hash costs ~25 ns more). It holds
 * max_services * 72 bytes on every possible CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KMESH_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct kmesh_stats);
} kmesh_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kmesh_config);
} kmesh_config SEC(".maps");

/* Not preallocated: pods come and go a few times a minute, and the program only tests an
 * entry for presence, so an element recycled under a reader cannot be misread. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KMESH_MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct kmesh_enrolment);
} kmesh_enrolled SEC(".maps");

/* Is this socket ours (SPEC.md section 9)? Only TCP and UDP: the core programs no other
 * protocol (SCTP ports are skipped with a warning), and without this a kernel with SCTP would
 * see an SCTP connect to a ClusterIP we serve on other ports refused by the ClusterIP guard
 * instead of reaching whatever handles SCTP. Then one array lookup in mode ALL (the verifier
 * inlines it), and a hash lookup of the netns cookie in mode CNI. */
static __always_inline int kmesh_ours(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	struct kmesh_config *config;
	__u64 cookie;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 0;
	config = bpf_map_lookup_elem(&kmesh_config, &zero);
	if (!config || config->enrolment != KMESH_ENROL_CNI)
		return 1;
	cookie = bpf_get_netns_cookie(ctx);
	return bpf_map_lookup_elem(&kmesh_enrolled, &cookie) != NULL;
}

static __always_inline void kmesh_count(__u32 sid, __u32 tier, int refused)
{
	struct kmesh_stats *stats = bpf_map_lookup_elem(&kmesh_stats, &sid);

	if (!stats)
		return; /* sid out of range: losing a count beats failing the connect */
	/* Atomic although the value is per CPU: the program cannot migrate while it runs, but
	 * under PREEMPT_RCU another task can preempt it on the same CPU between the load and the
	 * store of a plain ++ and lose that task's count. The add is uncontended (this CPU's
	 * copy), so it costs one locked instruction. */
	if (refused)
		__sync_fetch_and_add(&stats->refused, 1);
	else /* the mask proves the index in range */
		__sync_fetch_and_add(&stats->hits[tier & (KMESH_MAX_TIERS - 1)], 1);
}

#ifdef KMESH_TEST_RACE_WINDOW
/* Tests only (tests/kernel/test_races.py): spin this many bpf_loop rounds between looking a
 * frontend up and reading it, so that a test can recycle the element under a connect. */
static long kmesh_spin(__u64 index, void *ctx)
{
	return 0;
}
#define KMESH_RACE_WINDOW() bpf_loop(KMESH_TEST_RACE_WINDOW, kmesh_spin, NULL, 0)
#else
#define KMESH_RACE_WINDOW() \
	do {                \
	} while (0)
#endif

/* One 4-byte load the compiler may not split or repeat. */
#define READ_ONCE_U32(x) (*(volatile const __u32 *)&(x))

/* The 20 bytes of two frontend keys compared as five words (no memcmp in BPF). Both are
 * 4-byte aligned: map values are, and the programs align their stack key. */
static __always_inline int kmesh_same_frontend(const struct kmesh_frontend_key *a,
					       const struct kmesh_frontend_key *b)
{
	const __u32 *x = (const __u32 *)a;
	const __u32 *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

static __always_inline int kmesh_pick(const struct kmesh_frontend_key *key,
				      struct kmesh_endpoint *out)
{
	struct kmesh_frontend *frontend;
	struct kmesh_record *record;
	struct kmesh_endpoint *endpoint;
	struct kmesh_slot_key slot = {};
	__u32 *active;
	__u32 sid, set, index, ntiers, tier;

	frontend = bpf_map_lookup_elem(&kmesh_frontends, key);
	if (!frontend)
		goto no_frontend;
	KMESH_RACE_WINDOW();
	sid = READ_ONCE_U32(frontend->sid);

	active = bpf_map_lookup_elem(&kmesh_active, &sid);
	if (!active)
		goto refuse; /* sid out of range: refuse rather than leak the ClusterIP */
	/* Read the active set exactly once: every later lookup must use the same set. */
	set = *(volatile __u32 *)active & 1;

	index = sid * KMESH_SETS + set;
	record = bpf_map_lookup_elem(&kmesh_records, &index);
	if (!record)
		goto refuse;
	/* The element found may have been recycled for another frontend meanwhile (see struct
	 * kmesh_record): only a record that names this very frontend is ours. */
	if (!kmesh_same_frontend(&record->frontend, key))
		goto no_frontend;

	ntiers = record->ntiers;
	if (record->mode == KMESH_MODE_STRICT && ntiers > 1)
		ntiers = 1;

	/* Constant upper bound so the verifier can prove termination; ntiers ends it early. */
	for (tier = 0; tier < KMESH_MAX_TIERS; tier++) {
		__u32 count;

		if (tier >= ntiers)
			break;
		count = record->count[tier];
		if (!count)
			continue;

		slot.sid = sid;
		slot.set = set;
		slot.tier = tier;
		slot.index = bpf_get_prandom_u32() % count;
		endpoint = bpf_map_lookup_elem(&kmesh_slots, &slot);
		if (!endpoint)
			goto refuse; /* a count without its slot is a core bug: never pass through */
		__builtin_memcpy(out, endpoint, sizeof(*out));
		kmesh_count(sid, tier, 0);
		return KMESH_REWRITE;
	}
refuse:
	kmesh_count(sid, 0, 1);
	return KMESH_REFUSE;
no_frontend:
	/* A ClusterIP on a port/protocol it does not serve: refuse (no sid to count on).
	 * The address part of the key is a struct kmesh_vip. */
	if (bpf_map_lookup_elem(&kmesh_vips, key->addr))
		return KMESH_REFUSE;
	return KMESH_PASS;
}

static __always_inline int kmesh_refuse(struct bpf_sock_addr *ctx)
{
	/* Fail connect() with ECONNREFUSED instead of the default EPERM of a rejecting program,
	 * like kube-proxy's REJECT for a Service without endpoints. */
	bpf_set_retval(-ECONNREFUSED);
	return SOCK_ADDR_REJECT;
}

SEC("cgroup/connect4")
int kmesh_connect4(struct bpf_sock_addr *ctx)
{
	struct kmesh_frontend_key key __attribute__((aligned(4))) = {};
	struct kmesh_endpoint endpoint;
	__u32 ip4 = ctx->user_ip4;

	if (!kmesh_ours(ctx))
		return SOCK_ADDR_ALLOW;
	key.addr[10] = 0xff;
	key.addr[11] = 0xff;
	__builtin_memcpy(&key.addr[12], &ip4, sizeof(ip4));
	/* user_port holds the network-order port in its low 16 bits. */
	key.port = (__be16)ctx->user_port;
	key.protocol = ctx->protocol;

	switch (kmesh_pick(&key, &endpoint)) {
	case KMESH_REWRITE:
		__builtin_memcpy(&ip4, &endpoint.addr[12], sizeof(ip4));
		ctx->user_ip4 = ip4;
		ctx->user_port = endpoint.port;
		return SOCK_ADDR_ALLOW;
	case KMESH_REFUSE:
		return kmesh_refuse(ctx);
	default:
		return SOCK_ADDR_ALLOW;
	}
}

SEC("cgroup/connect6")
int kmesh_connect6(struct bpf_sock_addr *ctx)
{
	struct kmesh_frontend_key key __attribute__((aligned(4))) = {};
	struct kmesh_endpoint endpoint;
	__u32 word;

	if (!kmesh_ours(ctx))
		return SOCK_ADDR_ALLOW;
	/* The verifier allows only 4-byte accesses to user_ip6, one word at a time. A v4-mapped
	 * destination (::ffff:a.b.c.d) arrives here and matches the v4 frontend as stored. */
	word = ctx->user_ip6[0];
	__builtin_memcpy(&key.addr[0], &word, 4);
	word = ctx->user_ip6[1];
	__builtin_memcpy(&key.addr[4], &word, 4);
	word = ctx->user_ip6[2];
	__builtin_memcpy(&key.addr[8], &word, 4);
	word = ctx->user_ip6[3];
	__builtin_memcpy(&key.addr[12], &word, 4);
	key.port = (__be16)ctx->user_port;
	key.protocol = ctx->protocol;

	switch (kmesh_pick(&key, &endpoint)) {
	case KMESH_REWRITE:
		/* A v4 frontend has v4-mapped endpoints, which an IPv6 socket reaches as such. */
		__builtin_memcpy(&word, &endpoint.addr[0], 4);
		ctx->user_ip6[0] = word;
		__builtin_memcpy(&word, &endpoint.addr[4], 4);
		ctx->user_ip6[1] = word;
		__builtin_memcpy(&word, &endpoint.addr[8], 4);
		ctx->user_ip6[2] = word;
		__builtin_memcpy(&word, &endpoint.addr[12], 4);
		ctx->user_ip6[3] = word;
		ctx->user_port = endpoint.port;
		return SOCK_ADDR_ALLOW;
	case KMESH_REFUSE:
		return kmesh_refuse(ctx);
	default:
		return SOCK_ADDR_ALLOW;
	}
}
