// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * kmesh-plugin datapath: cgroup sock_addr programs that rewrite a connect() or an unconnected
 * UDP sendmsg() to a Service's ClusterIP:port into one endpoint, chosen by locality tier,
 * before any packet leaves; and that show the ClusterIP:port again where the application looks:
 * the source of a reply (recvmsg) and the peer of a connected socket (getpeername).
 *
 * Per connect or datagram: frontend lookup (kmesh_frontend_cache, then kmesh_frontends on a
 * miss) -> active set -> record -> first non-empty tier
 * (tier 0 only in strict mode) -> the client's affinity endpoint if the Service has
 * sessionAffinity and it is still there, else a uniform random slot in that tier -> rewrite
 * address and port. A frontend with no eligible endpoint refuses the call with ECONNREFUSED;
 * it never falls through to the ClusterIP, and neither does a ClusterIP on a port it does not
 * serve. Every other destination passes untouched. In enrolment mode CNI, a socket whose
 * network namespace the chained CNI plugin did not enrol is not ours: every connect and
 * datagram of it passes untouched, ClusterIPs included.
 *
 * The way back: connect() notes each translation in kmesh_translated and sendmsg() records it
 * in kmesh_reverse, both keyed by socket cookie and endpoint; recvmsg() and getpeername()
 * rewrite an address only when it is an endpoint that very socket was translated to.
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

_Static_assert((KMESH_FRONTEND_LINES & (KMESH_FRONTEND_LINES - 1)) == 0,
	       "a frontend line is a hash masked with KMESH_FRONTEND_LINES - 1");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KMESH_FRONTEND_LINES);
	__type(key, __u32);
	__type(value, struct kmesh_frontend_line);
} kmesh_frontend_cache SEC(".maps");

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

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KMESH_MAX_REVERSE);
	__type(key, struct kmesh_reverse_key);
	__type(value, struct kmesh_reverse);
} kmesh_reverse SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KMESH_MAX_TRANSLATED);
	__type(key, __u32);
	__type(value, struct kmesh_translation);
} kmesh_translated SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KMESH_MAX_AFFINITY);
	__type(key, struct kmesh_affinity_key);
	__type(value, struct kmesh_affinity);
} kmesh_affinity SEC(".maps");

/* Is this socket ours (SPEC.md section 9)? Only TCP and UDP: the core programs no other
 * protocol (SCTP ports are skipped with a warning), and without this a kernel with SCTP would
 * see an SCTP connect to a ClusterIP we serve on other ports refused by the ClusterIP guard
 * instead of reaching whatever handles SCTP. (sendmsg hooks run for UDP only.) Then one array lookup in mode ALL (the verifier
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
 * frontend up and reading it, and between the two halves of a kmesh_frontend_cache line's
 * copy, so that a test can recycle the element, or rewrite the line, under a connect. */
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

/* One 4- or 8-byte load or store the compiler may not split, repeat or move past another. */
#define READ_ONCE_U32(x) (*(volatile const __u32 *)&(x))
#define READ_ONCE_U64(x) (*(volatile const __u64 *)&(x))
#define WRITE_ONCE_U64(x, v) (*(volatile __u64 *)&(x) = (v))

/* Two 20-byte records (a frontend key, an endpoint: padding included, which is always 0)
 * compared as five words (no memcmp in BPF). Both are 4-byte aligned: map values are, and the
 * programs align their stack copies. */
static __always_inline int kmesh_same20(const void *a, const void *b)
{
	const __u32 *x = a;
	const __u32 *y = b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

static __always_inline int kmesh_same_frontend(const struct kmesh_frontend_key *a,
					       const struct kmesh_frontend_key *b)
{
	return kmesh_same20(a, b);
}

static __always_inline int kmesh_same_endpoint(const struct kmesh_endpoint *a,
					       const struct kmesh_endpoint *b)
{
	return kmesh_same20(a, b);
}

/* -1, 0 or 1 as endpoint a sorts before, equal to or after b: address bytes, then port, in
 * network order (the order the core sorts a tier of an affinity group in). */
static __always_inline int kmesh_compare(const struct kmesh_endpoint *a,
					 const struct kmesh_endpoint *b)
{
	const __u32 *x = (const __u32 *)a->addr;
	const __u32 *y = (const __u32 *)b->addr;
	__u32 i, p, q;

	for (i = 0; i < 4; i++) {
		p = __builtin_bswap32(x[i]);
		q = __builtin_bswap32(y[i]);
		if (p != q)
			return p < q ? -1 : 1;
	}
	p = __builtin_bswap16(a->port);
	q = __builtin_bswap16(b->port);
	if (p != q)
		return p < q ? -1 : 1;
	return 0;
}

#define NSEC_PER_SEC 1000000000ULL

/* sessionAffinity: the endpoint this client is held to, if it is still in the tier the
 * connect would pick from (slot->tier, holding count endpoints) and its last use is less than
 * timeout seconds ago. The slot of the last pick is tried first; after a publish moved the
 * endpoint, a binary search of the sorted tier finds it. */
static __always_inline int kmesh_sticky(struct kmesh_affinity *affinity, __u32 timeout,
					struct kmesh_slot_key *slot, __u32 count,
					struct kmesh_endpoint *out)
{
	struct kmesh_endpoint want;
	struct kmesh_endpoint *endpoint;
	__u64 now = bpf_ktime_get_ns();
	__u32 lo = 0, hi = count, step;
	int order;

	if (now - affinity->last_used > (__u64)timeout * NSEC_PER_SEC)
		return 0; /* expired: choose again */
	/* A copy: another CPU may rewrite the entry meanwhile. A torn copy finds no slot equal
	 * to it, or a real endpoint of this tier: never one outside the set. */
	__builtin_memcpy(&want, &affinity->endpoint, sizeof(want));
	if (affinity->tier == slot->tier && affinity->index < count) {
		slot->index = affinity->index;
		endpoint = bpf_map_lookup_elem(&kmesh_slots, slot);
		if (endpoint && kmesh_compare(endpoint, &want) == 0)
			goto found;
	}
	/* Constant bound for the verifier: KMESH_SEARCH_STEPS halvings cover any __u16 count. */
	for (step = 0; step < KMESH_SEARCH_STEPS; step++) {
		if (lo >= hi)
			return 0;
		slot->index = (lo + hi) / 2;
		endpoint = bpf_map_lookup_elem(&kmesh_slots, slot);
		if (!endpoint)
			return 0;
		order = kmesh_compare(endpoint, &want);
		if (order == 0)
			goto found;
		if (order < 0)
			lo = slot->index + 1;
		else
			hi = slot->index;
	}
	return 0;
found:
	__builtin_memcpy(out, endpoint, sizeof(*out));
	affinity->tier = slot->tier;
	affinity->index = slot->index;
	affinity->last_used = now;
	return 1;
}

/* murmur3's 64-bit finaliser: every input bit reaches every output bit. */
static __always_inline __u64 kmesh_mix(__u64 x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

/* One term of NH (the hash of UMAC): two 4-byte words, each offset by a key word, multiplied
 * into 64 bits. A sum of such terms is a universal hash (two inputs collide with odds of about
 * 2^-32), and the terms of one sum are independent of each other, so the CPU computes them side
 * by side: a chain of finalisers, each waiting on the last, was the largest part of what the
 * program cost above an empty one. kmesh_frontend_hash and kmesh_check end in one kmesh_mix,
 * which spreads the sum over every bit (the cache's pairs are its low and high bits). */
static __always_inline __u64 kmesh_nh(__u32 a, __u32 b, __u32 ka, __u32 kb)
{
	return (__u64)(__u32)(a + ka) * (__u32)(b + kb);
}

/* The NH key words (from the hexadecimal digits of pi): constants named once, because the
 * Python side computes the same hashes (records.py). */
#define KMESH_NH_0 0x243f6a88U
#define KMESH_NH_1 0x85a308d3U
#define KMESH_NH_2 0x13198a2eU
#define KMESH_NH_3 0x03707344U
#define KMESH_NH_4 0xa4093822U
#define KMESH_NH_5 0x299f31d0U
#define KMESH_NH_6 0x082efa98U
#define KMESH_NH_7 0xec4e6c89U
#define KMESH_NH_8 0x452821e6U
#define KMESH_NH_9 0x38d01377U
#define KMESH_NH_10 0xbe5466cfU
#define KMESH_NH_11 0x34e90c6cU

/* A frontend key's hash (its five words, padding included, and a sixth of 0): the lines of
 * kmesh_frontend_cache it may sit in, and what their check is made of. */
static __always_inline __u64 kmesh_frontend_hash(const struct kmesh_frontend_key *key)
{
	const __u32 *w = (const __u32 *)key;

	return kmesh_mix(KMESH_FRONTEND_SEED ^ (kmesh_nh(w[0], w[1], KMESH_NH_0, KMESH_NH_1) +
						kmesh_nh(w[2], w[3], KMESH_NH_2, KMESH_NH_3) +
						kmesh_nh(w[4], 0, KMESH_NH_4, KMESH_NH_5)));
}

/* A kmesh_frontend_cache line's check: the key's hash with the sid in its upper half, so that
 * a line whose key and sid come from two writes fails it; bit 0 set, so that 0 stays "empty". */
static __always_inline __u64 kmesh_line_check(__u64 hash, __u32 sid)
{
	return (hash ^ (__u64)sid << 32) | 1;
}

/* The sid one kmesh_frontend_cache line holds for key, if the line is whole and names key (see
 * struct kmesh_frontend_line). The line is copied with volatile loads: the compiler may not
 * read a field from the map again after the check. */
static __always_inline int kmesh_line_sid(__u32 index, const struct kmesh_frontend_key *key,
					  __u64 hash, __u32 *sid)
{
	union {
		struct kmesh_frontend_line line;
		__u64 words[4];
	} seen;
	const __u64 *words;

	_Static_assert(sizeof(seen) == sizeof(seen.line), "a line is four 8-byte words");
	words = bpf_map_lookup_elem(&kmesh_frontend_cache, &index);
	if (!words)
		return 0;
	seen.words[0] = READ_ONCE_U64(words[0]);
	seen.words[1] = READ_ONCE_U64(words[1]);
	KMESH_RACE_WINDOW(); /* tests: a writer may rewrite the line between the halves */
	seen.words[2] = READ_ONCE_U64(words[2]);
	seen.words[3] = READ_ONCE_U64(words[3]);
	if (!seen.line.check || !kmesh_same_frontend(&seen.line.frontend, key) ||
	    seen.line.check != kmesh_line_check(hash, seen.line.sid))
		return 0;
	*sid = seen.line.sid;
	return 1;
}

/* The sid kmesh_frontend_cache holds for key, from any line of its two pairs (the first pair
 * from the hash's low bits, the second from its high bits); 0 on a miss, which
 * kmesh_frontends answers. Most frontends sit in their first pair, so the second is read on a
 * miss only. */
static __always_inline int kmesh_cached_sid(const struct kmesh_frontend_key *key, __u32 *sid)
{
	__u64 hash = kmesh_frontend_hash(key);
	__u32 first = (__u32)hash & (KMESH_FRONTEND_LINES - KMESH_FRONTEND_WAYS);
	__u32 second = (__u32)(hash >> 32) & (KMESH_FRONTEND_LINES - KMESH_FRONTEND_WAYS);

	_Static_assert(KMESH_FRONTEND_WAYS == 2, "the lines of a pair are tried one by one");
	return kmesh_line_sid(first, key, hash, sid) || kmesh_line_sid(first + 1, key, hash, sid) ||
	       kmesh_line_sid(second, key, hash, sid) || kmesh_line_sid(second + 1, key, hash, sid);
}

/* chance: a uniform random number, which picks the slot of a new choice. */
static __always_inline int kmesh_pick(void *ctx, const struct kmesh_frontend_key *key,
				      __u32 chance, struct kmesh_endpoint *out)
{
	struct kmesh_frontend *frontend;
	struct kmesh_record *record;
	struct kmesh_endpoint *endpoint;
	struct kmesh_slot_key slot = {};
	struct kmesh_affinity_key held __attribute__((aligned(8))) = {};
	struct kmesh_affinity *affinity = NULL;
	struct kmesh_affinity chosen = {};
	__u32 *active;
	__u32 sid, set, index, ntiers, tier, count = 0, timeout;

	if (!kmesh_cached_sid(key, &sid)) {
		frontend = bpf_map_lookup_elem(&kmesh_frontends, key);
		if (!frontend)
			goto no_frontend;
		KMESH_RACE_WINDOW();
		sid = READ_ONCE_U32(frontend->sid);
	}

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

	/* The first non-empty tier. Constant upper bound so the verifier can prove termination;
	 * ntiers ends it early. */
	for (tier = 0; tier < KMESH_MAX_TIERS; tier++) {
		if (tier >= ntiers)
			break;
		count = record->count[tier];
		if (count)
			break;
	}
	if (!count || tier >= ntiers)
		goto refuse;
	slot.sid = sid;
	slot.set = set;
	slot.tier = tier;

	timeout = record->affinity_timeout;
	if (timeout) {
		held.netns_cookie = bpf_get_netns_cookie(ctx);
		__builtin_memcpy(&held.frontend, key, sizeof(held.frontend));
		affinity = bpf_map_lookup_elem(&kmesh_affinity, &held);
		if (affinity && kmesh_sticky(affinity, timeout, &slot, count, out))
			goto picked;
	}

	/* chance scaled to [0, count): a multiply instead of a division (bias under 2^-16). */
	slot.index = ((__u64)chance * count) >> 32;
	if (tier == record->inline_tier && slot.index < KMESH_INLINE_SLOTS) {
		/* The mask is a no-op the verifier needs to prove the index in bounds. */
		endpoint = &record->inline_slots[slot.index & (KMESH_INLINE_SLOTS - 1)];
	} else {
		endpoint = bpf_map_lookup_elem(&kmesh_slots, &slot);
		if (!endpoint)
			goto refuse; /* a count without its slot is a core bug: never pass through */
	}
	__builtin_memcpy(out, endpoint, sizeof(*out));
	if (timeout) {
		/* A new choice (first connect, expiry, or the endpoint left the best tier). An
		 * entry the LRU must evict to make room costs that client its affinity only. */
		__builtin_memcpy(&chosen.endpoint, out, sizeof(chosen.endpoint));
		chosen.tier = tier;
		chosen.index = slot.index;
		chosen.last_used = bpf_ktime_get_ns();
		bpf_map_update_elem(&kmesh_affinity, &held, &chosen, BPF_ANY);
	}
picked:
	kmesh_count(sid, tier, 0);
	return KMESH_REWRITE;
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
	/* Fail connect() or sendmsg() with ECONNREFUSED instead of the default EPERM of a
	 * rejecting program, like kube-proxy's REJECT for a Service without endpoints. */
	bpf_set_retval(-ECONNREFUSED);
	return SOCK_ADDR_REJECT;
}

/* The destination (connect, sendmsg) or source (recvmsg) or peer (getpeername) address of
 * ctx, 16 bytes v4-mapped for IPv4, and its port. */
static __always_inline void kmesh_read4(struct bpf_sock_addr *ctx, __u8 addr[16], __be16 *port)
{
	__u32 ip4 = ctx->user_ip4;

	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(&addr[12], &ip4, sizeof(ip4));
	/* user_port holds the network-order port in its low 16 bits. */
	*port = (__be16)ctx->user_port;
}

static __always_inline void kmesh_read6(struct bpf_sock_addr *ctx, __u8 addr[16], __be16 *port)
{
	__u32 word;

	/* The verifier allows only 4-byte accesses to user_ip6, one word at a time. A v4-mapped
	 * address (::ffff:a.b.c.d) arrives here and matches the v4 frontend as stored. */
	word = ctx->user_ip6[0];
	__builtin_memcpy(&addr[0], &word, 4);
	word = ctx->user_ip6[1];
	__builtin_memcpy(&addr[4], &word, 4);
	word = ctx->user_ip6[2];
	__builtin_memcpy(&addr[8], &word, 4);
	word = ctx->user_ip6[3];
	__builtin_memcpy(&addr[12], &word, 4);
	*port = (__be16)ctx->user_port;
}

static __always_inline void kmesh_write4(struct bpf_sock_addr *ctx, const __u8 addr[16],
					 __be16 port)
{
	__u32 ip4;

	__builtin_memcpy(&ip4, &addr[12], sizeof(ip4));
	ctx->user_ip4 = ip4;
	ctx->user_port = port;
}

static __always_inline void kmesh_write6(struct bpf_sock_addr *ctx, const __u8 addr[16],
					 __be16 port)
{
	__u32 word;

	/* A v4 frontend has v4-mapped endpoints, which an IPv6 socket reaches as such. */
	__builtin_memcpy(&word, &addr[0], 4);
	ctx->user_ip6[0] = word;
	__builtin_memcpy(&word, &addr[4], 4);
	ctx->user_ip6[1] = word;
	__builtin_memcpy(&word, &addr[8], 4);
	ctx->user_ip6[2] = word;
	__builtin_memcpy(&word, &addr[12], 4);
	ctx->user_ip6[3] = word;
	ctx->user_port = port;
}

/* A socket's kmesh_translated slot: its cookie's low bits. The kernel hands cookies out in
 * per-CPU runs of consecutive numbers, so the connects of one CPU write consecutive slots (a
 * line just written is still in its cache, where a hashed slot was a cache miss: ~35 ns), and
 * a slot is taken again only 65,536 cookies later: first in, first out, where a hash would
 * lose an entry to any later connect with odds of 2^-16 each. */
static __always_inline __u32 kmesh_slot_of(__u64 socket_cookie)
{
	return (__u32)socket_cookie & (KMESH_MAX_TRANSLATED - 1);
}

/* struct kmesh_translation's check over its fields: the NH sum of the cookie's two halves, the
 * endpoint and the frontend (twelve words, six independent terms), mixed; never 0, which marks
 * an empty slot. */
static __always_inline __u64 kmesh_check(__u64 socket_cookie,
					 const struct kmesh_endpoint *endpoint,
					 const struct kmesh_frontend_key *frontend)
{
	const __u32 *e = (const __u32 *)endpoint;
	const __u32 *f = (const __u32 *)frontend;
	__u64 sum;

	sum = kmesh_nh((__u32)socket_cookie, (__u32)(socket_cookie >> 32), KMESH_NH_0,
		       KMESH_NH_1) +
	      kmesh_nh(e[0], e[1], KMESH_NH_2, KMESH_NH_3) +
	      kmesh_nh(e[2], e[3], KMESH_NH_4, KMESH_NH_5) +
	      kmesh_nh(e[4], f[0], KMESH_NH_6, KMESH_NH_7) +
	      kmesh_nh(f[1], f[2], KMESH_NH_8, KMESH_NH_9) +
	      kmesh_nh(f[3], f[4], KMESH_NH_10, KMESH_NH_11);
	return kmesh_mix(sum) | 1;
}

/* connect() translated: note (socket, endpoint) -> frontend in kmesh_translated, without a
 * lock or a helper call (see struct kmesh_translation). check goes last: a reader that sees
 * the new check sees the fields it covers, or a mixture that fails it. */
static __always_inline void kmesh_note(__u64 cookie, const struct kmesh_frontend_key *key,
				       const struct kmesh_endpoint *endpoint)
{
	__u32 slot = kmesh_slot_of(cookie);
	struct kmesh_translation *t = bpf_map_lookup_elem(&kmesh_translated, &slot);

	if (!t)
		return;
	WRITE_ONCE_U64(t->check, 0); /* readers miss while the fields change */
	t->socket_cookie = cookie;
	__builtin_memcpy(&t->endpoint, endpoint, sizeof(t->endpoint));
	__builtin_memcpy(&t->frontend, key, sizeof(t->frontend));
	WRITE_ONCE_U64(t->check, kmesh_check(cookie, endpoint, key));
}

/* An unconnected UDP sendmsg() translated: remember (socket, endpoint) -> frontend in
 * kmesh_reverse. It looks first: a resolver sends many datagrams to one endpoint, and a hit
 * costs no LRU update. */
static __always_inline void kmesh_remember(__u64 cookie, const struct kmesh_frontend_key *key,
					   const struct kmesh_endpoint *endpoint)
{
	struct kmesh_reverse_key way __attribute__((aligned(8))) = {};
	struct kmesh_reverse back;
	struct kmesh_reverse *known;

	way.socket_cookie = cookie;
	__builtin_memcpy(&way.endpoint, endpoint, sizeof(way.endpoint));
	known = bpf_map_lookup_elem(&kmesh_reverse, &way);
	if (known && kmesh_same_frontend(&known->frontend, key))
		return;
	__builtin_memcpy(&back.frontend, key, sizeof(back.frontend));
	bpf_map_update_elem(&kmesh_reverse, &way, &back, BPF_ANY);
}

/* connect() or sendmsg() to an address that is no frontend: if this socket was translated to
 * that very address before, its replies and peer are the address itself from now on. */
static __always_inline void kmesh_forget(__u64 cookie, const struct kmesh_frontend_key *key)
{
	struct kmesh_reverse_key way __attribute__((aligned(8))) = {};
	struct kmesh_translation *t;
	__u32 slot = kmesh_slot_of(cookie);

	way.socket_cookie = cookie;
	__builtin_memcpy(way.endpoint.addr, key->addr, sizeof(way.endpoint.addr));
	way.endpoint.port = key->port;
	if (bpf_map_lookup_elem(&kmesh_reverse, &way))
		bpf_map_delete_elem(&kmesh_reverse, &way);
	t = bpf_map_lookup_elem(&kmesh_translated, &slot);
	if (t && READ_ONCE_U64(t->socket_cookie) == cookie)
		WRITE_ONCE_U64(t->check, 0);
}

/* recvmsg() and getpeername(): the frontend a translated socket asked for, copied to *asked,
 * if ``from`` is an endpoint it was translated to. Nothing is ours to check here: a socket we
 * never translated has no entry. kmesh_reverse first (unconnected UDP, and what an earlier
 * call moved there), then kmesh_translated, whose entry moves to kmesh_reverse. */
static __always_inline int kmesh_asked(struct bpf_sock_addr *ctx,
				       const struct kmesh_endpoint *from,
				       struct kmesh_frontend_key *asked)
{
	struct kmesh_reverse_key way __attribute__((aligned(8))) = {};
	struct kmesh_translation seen __attribute__((aligned(8)));
	struct kmesh_translation *t;
	struct kmesh_reverse *back;
	__u32 slot;

	way.socket_cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(&way.endpoint, from, sizeof(way.endpoint));
	back = bpf_map_lookup_elem(&kmesh_reverse, &way);
	if (back) {
		__builtin_memcpy(asked, &back->frontend, sizeof(*asked));
		return 1;
	}
	slot = kmesh_slot_of(way.socket_cookie);
	t = bpf_map_lookup_elem(&kmesh_translated, &slot);
	if (!t)
		return 0;
	/* A copy, check first: a writer changes check last, so a check read before the fields
	 * that still matches them after names what those fields held together. */
	seen.check = READ_ONCE_U64(t->check);
	if (!seen.check)
		return 0;
	__builtin_memcpy(&seen, t, __builtin_offsetof(struct kmesh_translation, check));
	if (seen.socket_cookie != way.socket_cookie ||
	    !kmesh_same_endpoint(&seen.endpoint, from) ||
	    seen.check != kmesh_check(seen.socket_cookie, &seen.endpoint, &seen.frontend))
		return 0;
	__builtin_memcpy(asked, &seen.frontend, sizeof(*asked));
	/* Used: keep it where an LRU holds it while it is, and out of the way of new connects. */
	bpf_map_update_elem(&kmesh_reverse, &way, (struct kmesh_reverse *)asked, BPF_ANY);
	return 1;
}

/* What connect4/6 and sendmsg4/6 (datagram) share: translate the destination, or refuse it. */
static __always_inline int kmesh_translate(struct bpf_sock_addr *ctx, int family, int datagram)
{
	struct kmesh_frontend_key key __attribute__((aligned(4))) = {};
	struct kmesh_endpoint endpoint __attribute__((aligned(4)));
	__u64 cookie;
	__u32 chance;
	int verdict;

	if (!kmesh_ours(ctx))
		return SOCK_ADDR_ALLOW;
	if (family == 4)
		kmesh_read4(ctx, key.addr, &key.port);
	else
		kmesh_read6(ctx, key.addr, &key.port);
	key.protocol = ctx->protocol;

	/* Every outcome but a refusal needs the cookie: taken once. */
	cookie = bpf_get_socket_cookie(ctx);
	/* A connect's random pick comes from its socket's cookie and the clock's jiffies (an
	 * inlined load), mixed: the prandom helper call costs ~30 ns, a third of what the rest
	 * of the program may take. Cookies are never reused, so sockets pick independently, and
	 * the same socket connecting again a tick later picks again. A datagram keeps the
	 * helper: the datagrams of one socket are each picked anew. */
	if (datagram)
		chance = bpf_get_prandom_u32();
	else
		chance = (__u32)kmesh_mix(cookie ^ (bpf_jiffies64() << 40));
	verdict = kmesh_pick(ctx, &key, chance, &endpoint);
	switch (verdict) {
	case KMESH_REWRITE:
		if (datagram)
			kmesh_remember(cookie, &key, &endpoint);
		else
			kmesh_note(cookie, &key, &endpoint);
		if (family == 4)
			kmesh_write4(ctx, endpoint.addr, endpoint.port);
		else
			kmesh_write6(ctx, endpoint.addr, endpoint.port);
		return SOCK_ADDR_ALLOW;
	case KMESH_REFUSE:
		return kmesh_refuse(ctx);
	default:
		kmesh_forget(cookie, &key);
		return SOCK_ADDR_ALLOW;
	}
}

/* What recvmsg4/6 and getpeername4/6 share: show the frontend instead of its endpoint. Both
 * hooks must return 1 (they cannot fail the call). */
static __always_inline int kmesh_untranslate(struct bpf_sock_addr *ctx, int family)
{
	struct kmesh_endpoint from __attribute__((aligned(4))) = {};
	struct kmesh_frontend_key asked __attribute__((aligned(4)));

	if (family == 4)
		kmesh_read4(ctx, from.addr, &from.port);
	else
		kmesh_read6(ctx, from.addr, &from.port);
	if (!kmesh_asked(ctx, &from, &asked))
		return SOCK_ADDR_ALLOW;
	if (family == 4)
		kmesh_write4(ctx, asked.addr, asked.port);
	else
		kmesh_write6(ctx, asked.addr, asked.port);
	return SOCK_ADDR_ALLOW;
}

SEC("cgroup/connect4")
int kmesh_connect4(struct bpf_sock_addr *ctx)
{
	return kmesh_translate(ctx, 4, 0);
}

SEC("cgroup/connect6")
int kmesh_connect6(struct bpf_sock_addr *ctx)
{
	return kmesh_translate(ctx, 6, 0);
}

SEC("cgroup/sendmsg4")
int kmesh_sendmsg4(struct bpf_sock_addr *ctx)
{
	return kmesh_translate(ctx, 4, 1);
}

SEC("cgroup/sendmsg6")
int kmesh_sendmsg6(struct bpf_sock_addr *ctx)
{
	return kmesh_translate(ctx, 6, 1);
}

SEC("cgroup/recvmsg4")
int kmesh_recvmsg4(struct bpf_sock_addr *ctx)
{
	return kmesh_untranslate(ctx, 4);
}

SEC("cgroup/recvmsg6")
int kmesh_recvmsg6(struct bpf_sock_addr *ctx)
{
	return kmesh_untranslate(ctx, 6);
}

SEC("cgroup/getpeername4")
int kmesh_getpeername4(struct bpf_sock_addr *ctx)
{
	return kmesh_untranslate(ctx, 4);
}

/* A socket closes: drop the kmesh_reverse entry of its peer, if a getpeername() or recvmsg()
 * moved one there, so that a busy node's kmesh_reverse holds live sockets instead of filling
 * up with closed ones (an update into a full LRU must evict, several times the cost of one
 * into free room). The lookup first spares most sockets the delete, which takes a lock. Its
 * kmesh_translated slot stays: a cookie is never reused, so nothing matches it again. What an
 * unconnected UDP socket sent to many endpoints cannot be enumerated here; those entries age
 * out of the LRU. */
SEC("cgroup/sock_release")
int kmesh_release(struct bpf_sock *sk)
{
	struct kmesh_reverse_key way __attribute__((aligned(8))) = {};
	__u32 word;

	if (sk->protocol != IPPROTO_TCP && sk->protocol != IPPROTO_UDP)
		return 1;
	if (sk->family == 2 /* AF_INET */) {
		word = sk->dst_ip4;
		if (!word)
			return 1; /* never connected */
		way.endpoint.addr[10] = 0xff;
		way.endpoint.addr[11] = 0xff;
		__builtin_memcpy(&way.endpoint.addr[12], &word, 4);
	} else {
		/* One 4-byte load per word, as the verifier allows for dst_ip6. */
		word = sk->dst_ip6[0];
		__builtin_memcpy(&way.endpoint.addr[0], &word, 4);
		word = sk->dst_ip6[1];
		__builtin_memcpy(&way.endpoint.addr[4], &word, 4);
		word = sk->dst_ip6[2];
		__builtin_memcpy(&way.endpoint.addr[8], &word, 4);
		word = sk->dst_ip6[3];
		__builtin_memcpy(&way.endpoint.addr[12], &word, 4);
	}
	way.endpoint.port = sk->dst_port;
	if (!way.endpoint.port)
		return 1;
	way.socket_cookie = bpf_get_socket_cookie(sk);
	if (bpf_map_lookup_elem(&kmesh_reverse, &way))
		bpf_map_delete_elem(&kmesh_reverse, &way);
	return 1;
}

SEC("cgroup/getpeername6")
int kmesh_getpeername6(struct bpf_sock_addr *ctx)
{
	return kmesh_untranslate(ctx, 6);
}
