// SPDX-License-Identifier: Apache-2.0
/*
 * loadgen: the benchmark's connection client and server, in C so that Python is never the
 * bottleneck of a datapath measurement.
 *
 *   loadgen server PORT THREADS
 *       Dual-stack listener on [::]:PORT, one SO_REUSEPORT socket per thread. Per connection:
 *       read once; if the client sent a request, answer "OK\n"; close. Also a dual-stack UDP
 *       echo server on [::]:PORT (THREADS SO_REUSEPORT sockets): every datagram goes back to
 *       its sender as it came. Prints "ready".
 *
 *   loadgen client ADDR PORT MODE DURATION_MS THREADS
 *       MODE "cc": connect + close. MODE "rr": connect, send "GET\n", read the answer, close.
 *       Every connection is new (a new connect(), so a new load-balancing decision). Closes
 *       with SO_LINGER 0 (RST): no TIME_WAIT, so ports never run out in a long loop.
 *       MODE "udp": one unconnected UDP socket per thread; round trips of sendto(ADDR:PORT)
 *       of an 8-byte sequence number + recvfrom() of its echo (a stale echo of an earlier,
 *       timed-out round is skipped). The echo's source must be ADDR:PORT.
 *       MODE "peer": one UDP socket per thread, connect()ed once to ADDR:PORT; then
 *       getpeername() in a loop, whose answer must be ADDR:PORT. Nothing is sent.
 *
 *   loadgen pair MODE DURATION_MS BLOCK_MS ADDR_A PORT_A ADDR_B PORT_B NETNS_B CGROUP_B
 *       Two paths side by side in one thread, alternating blocks (see run_pair).
 *       Prints one JSON line: connections (operations: connections, round trips or calls),
 *       errors by errno ("wrong_peer": a source or peer other than ADDR:PORT; "11": a round
 *       trip without an echo in UDP_TIMEOUT_MS), seconds, rate, latency percentiles.
 *
 * Bounded by design: a client stops after DURATION_MS (at most 600 s), a server on SIGTERM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define MAX_DURATION_MS 600000
#define MAX_ERRNO 256
#define SAMPLE_CAP (1u << 22) /* latencies kept per thread; more are counted, not kept */
#define WRONG_PEER (MAX_ERRNO - 1) /* errors[] slot of a wrong source/peer (no errno is 255) */
#define UDP_TIMEOUT_MS 200

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- server ------------------------------------------------------------------------------ */

static int bound_socket(int port, int type)
{
	struct sockaddr_in6 addr = { .sin6_family = AF_INET6, .sin6_port = htons(port),
				     .sin6_addr = IN6ADDR_ANY_INIT };
	int one = 1, zero = 0;
	int fd = socket(AF_INET6, type, 0);

	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    (type == SOCK_STREAM && listen(fd, 4096) < 0)) {
		close(fd);
		return -1;
	}
	return fd;
}

static void *serve(void *arg)
{
	int lfd = *(int *)arg;
	char buf[64];

	for (;;) {
		int fd = accept(lfd, NULL, NULL);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			return NULL;
		}
		if (recv(fd, buf, sizeof(buf), 0) > 0)
			send(fd, "OK\n", 3, MSG_NOSIGNAL);
		close(fd);
	}
}

static void *echo(void *arg)
{
	int fd = *(int *)arg;
	char buf[2048];
	struct sockaddr_in6 from;

	for (;;) {
		socklen_t len = sizeof(from);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return NULL;
		}
		sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&from, len);
	}
}

static int run_server(int port, int threads)
{
	pthread_t tid[2 * MAX_THREADS];
	int fds[2 * MAX_THREADS];

	for (int i = 0; i < 2 * threads; i++) {
		fds[i] = bound_socket(port, i < threads ? SOCK_STREAM : SOCK_DGRAM);
		if (fds[i] < 0) {
			fprintf(stderr, "loadgen server: %s port %d: %s\n",
				i < threads ? "listen on TCP" : "bind UDP", port, strerror(errno));
			return 1;
		}
	}
	for (int i = 0; i < 2 * threads; i++)
		pthread_create(&tid[i], NULL, i < threads ? serve : echo, &fds[i]);
	printf("ready\n");
	fflush(stdout);
	for (int i = 0; i < 2 * threads; i++)
		pthread_join(tid[i], NULL);
	return 0;
}

/* ---- client ------------------------------------------------------------------------------ */

enum mode { MODE_CC, MODE_RR, MODE_UDP, MODE_PEER };

struct target {
	struct sockaddr_storage addr;
	socklen_t len;
	int family;
	enum mode mode;
	uint64_t deadline;
};

struct worker {
	const struct target *t;
	int fd;       /* udp, peer: the thread's one socket */
	uint64_t seq; /* udp: the last sequence number sent */
	uint64_t count;
	uint64_t errors[MAX_ERRNO];
	uint32_t *samples; /* latency in ns, capped */
	uint64_t kept;
};

/* Is addr (as recvfrom or getpeername filled it in) the target's address and port? */
static int is_target(const struct target *t, const struct sockaddr_storage *addr, socklen_t len)
{
	if (addr->ss_family != t->family || len < t->len)
		return 0;
	if (t->family == AF_INET) {
		const struct sockaddr_in *a = (const void *)addr, *b = (const void *)&t->addr;

		return a->sin_addr.s_addr == b->sin_addr.s_addr && a->sin_port == b->sin_port;
	}
	const struct sockaddr_in6 *a = (const void *)addr, *b = (const void *)&t->addr;

	return !memcmp(&a->sin6_addr, &b->sin6_addr, sizeof(a->sin6_addr)) &&
	       a->sin6_port == b->sin6_port;
}

static int one_connection(const struct target *t)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };
	char buf[16];
	int err = 0;
	int fd = socket(t->family, SOCK_STREAM, 0);

	if (fd < 0)
		return errno;
	if (connect(fd, (const struct sockaddr *)&t->addr, t->len) < 0) {
		err = errno;
	} else if (t->mode == MODE_RR) {
		if (send(fd, "GET\n", 4, MSG_NOSIGNAL) != 4)
			err = errno ? errno : EIO;
		else if (recv(fd, buf, sizeof(buf), 0) <= 0)
			err = errno ? errno : ECONNRESET;
	}
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(fd);
	return err;
}

/* One UDP round trip on the thread's unconnected socket. */
static int one_datagram(struct worker *w)
{
	const struct target *t = w->t;
	uint64_t seq = ++w->seq, got;
	struct sockaddr_storage from;
	socklen_t len;
	ssize_t n;

	if (sendto(w->fd, &seq, sizeof(seq), 0, (const struct sockaddr *)&t->addr, t->len) !=
	    (ssize_t)sizeof(seq))
		return errno ? errno : EIO;
	do { /* skip the late echo of a round that timed out */
		len = sizeof(from);
		n = recvfrom(w->fd, &got, sizeof(got), 0, (struct sockaddr *)&from, &len);
		if (n < 0)
			return errno;
	} while (n != (ssize_t)sizeof(got) || got != seq);
	return is_target(t, &from, len) ? 0 : WRONG_PEER;
}

static int one_getpeername(struct worker *w)
{
	struct sockaddr_storage peer;
	socklen_t len = sizeof(peer);

	if (getpeername(w->fd, (struct sockaddr *)&peer, &len) < 0)
		return errno;
	return is_target(w->t, &peer, len) ? 0 : WRONG_PEER;
}

/* udp, peer: the thread's socket; an errno if it cannot be made. */
static int open_socket(struct worker *w)
{
	const struct target *t = w->t;
	struct timeval tv = { .tv_sec = 0, .tv_usec = UDP_TIMEOUT_MS * 1000 };

	w->fd = socket(t->family, SOCK_DGRAM, 0);
	if (w->fd < 0)
		return errno;
	if (t->mode == MODE_UDP)
		return setsockopt(w->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ? errno : 0;
	return connect(w->fd, (const struct sockaddr *)&t->addr, t->len) < 0 ? errno : 0;
}

/* Operations of w's mode until ``until`` (ns, CLOCK_MONOTONIC); the time it stopped. */
static uint64_t run_for(struct worker *w, uint64_t until)
{
	for (;;) {
		uint64_t start = now_ns();
		int err;

		if (start >= until)
			return start;
		if (w->t->mode == MODE_UDP)
			err = one_datagram(w);
		else if (w->t->mode == MODE_PEER)
			err = one_getpeername(w);
		else
			err = one_connection(w->t);
		if (err) {
			w->errors[err < MAX_ERRNO ? err : 0]++;
			continue;
		}
		w->count++;
		if (w->kept < SAMPLE_CAP) {
			uint64_t d = now_ns() - start;

			w->samples[w->kept++] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
		}
	}
}

static void *drive(void *arg)
{
	struct worker *w = arg;
	int err;

	w->fd = -1;
	if (w->t->mode == MODE_UDP || w->t->mode == MODE_PEER) {
		err = open_socket(w);
		if (err) {
			w->errors[err < MAX_ERRNO ? err : 0]++;
			if (w->fd >= 0)
				close(w->fd);
			return NULL;
		}
	}
	run_for(w, w->t->deadline);
	if (w->fd >= 0)
		close(w->fd);
	return NULL;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

static double percentile(const uint32_t *sorted, uint64_t n, double p)
{
	if (!n)
		return 0;
	return sorted[(uint64_t)((double)(n - 1) * p)] / 1000.0;
}

static int parse_target(struct target *t, const char *host, int port, const char *mode)
{
	struct sockaddr_in *v4 = (struct sockaddr_in *)&t->addr;
	struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&t->addr;

	memset(t, 0, sizeof(*t));
	if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
		v4->sin_family = t->family = AF_INET;
		v4->sin_port = htons(port);
		t->len = sizeof(*v4);
	} else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
		v6->sin6_family = t->family = AF_INET6;
		v6->sin6_port = htons(port);
		t->len = sizeof(*v6);
	} else {
		fprintf(stderr, "loadgen: %s is not an IP address\n", host);
		return 2;
	}
	if (strcmp(mode, "cc") == 0) {
		t->mode = MODE_CC;
	} else if (strcmp(mode, "rr") == 0) {
		t->mode = MODE_RR;
	} else if (strcmp(mode, "udp") == 0) {
		t->mode = MODE_UDP;
	} else if (strcmp(mode, "peer") == 0) {
		t->mode = MODE_PEER;
	} else {
		fprintf(stderr, "loadgen: unknown mode %s\n", mode);
		return 2;
	}
	return 0;
}

/* The report of workers w[0..n): one JSON object, without a newline. */
static void print_report(struct worker *w, int n, uint64_t elapsed)
{
	uint64_t total = 0, kept = 0, errors[MAX_ERRNO] = { 0 };
	uint32_t *all;
	int first = 1;

	for (int i = 0; i < n; i++) {
		total += w[i].count;
		kept += w[i].kept;
		for (int e = 0; e < MAX_ERRNO; e++)
			errors[e] += w[i].errors[e];
	}
	all = malloc((kept ? kept : 1) * sizeof(uint32_t));
	kept = 0;
	for (int i = 0; i < n; i++) {
		memcpy(all + kept, w[i].samples, w[i].kept * sizeof(uint32_t));
		kept += w[i].kept;
	}
	qsort(all, kept, sizeof(uint32_t), cmp_u32);
	printf("{\"connections\": %llu, \"seconds\": %.6f, \"rate\": %.1f, "
	       "\"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"errors\": {",
	       (unsigned long long)total, elapsed / 1e9, elapsed ? total / (elapsed / 1e9) : 0,
	       percentile(all, kept, 0.50), percentile(all, kept, 0.90),
	       percentile(all, kept, 0.99));
	for (int e = 0; e < MAX_ERRNO; e++) {
		if (!errors[e])
			continue;
		if (e == WRONG_PEER)
			printf("%s\"wrong_peer\": %llu", first ? "" : ", ",
			       (unsigned long long)errors[e]);
		else
			printf("%s\"%d\": %llu", first ? "" : ", ", e,
			       (unsigned long long)errors[e]);
		first = 0;
	}
	printf("}}");
	free(all);
}

static int run_client(const char *host, int port, const char *mode, long duration_ms, int threads)
{
	struct target t;
	struct worker *w = calloc((size_t)threads, sizeof(*w));
	pthread_t tid[MAX_THREADS];
	uint64_t started;
	int err = parse_target(&t, host, port, mode);

	if (err) {
		free(w);
		return err;
	}
	started = now_ns();
	t.deadline = started + (uint64_t)duration_ms * 1000000ull;
	for (int i = 0; i < threads; i++) {
		w[i].t = &t;
		w[i].samples = malloc(SAMPLE_CAP * sizeof(uint32_t));
		pthread_create(&tid[i], NULL, drive, &w[i]);
	}
	for (int i = 0; i < threads; i++)
		pthread_join(tid[i], NULL);
	print_report(w, threads, now_ns() - started);
	printf("\n");
	for (int i = 0; i < threads; i++)
		free(w[i].samples);
	free(w);
	return 0;
}

/* Join the network namespace at netns_path and move this process into cgroup (a cgroup v2
 * directory): the sockets it makes from now on are that pod's. */
static int enter(const char *netns_path, const char *cgroup)
{
	char procs[4096];
	int fd = open(netns_path, O_RDONLY | O_CLOEXEC);

	if (fd < 0 || setns(fd, CLONE_NEWNET) < 0) {
		fprintf(stderr, "loadgen pair: join %s: %s\n", netns_path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return 1;
	}
	close(fd);
	snprintf(procs, sizeof(procs), "%s/cgroup.procs", cgroup);
	fd = open(procs, O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, "0", 1) != 1) { /* "0": the writing process */
		fprintf(stderr, "loadgen pair: join %s: %s\n", cgroup, strerror(errno));
		if (fd >= 0)
			close(fd);
		return 1;
	}
	close(fd);
	return 0;
}

/*
 * loadgen pair MODE DURATION_MS BLOCK_MS ADDR_A PORT_A ADDR_B PORT_B NETNS_B CGROUP_B
 *
 * One thread, two paths measured side by side: socket A is made where the process starts
 * (its pod and cgroup), socket B after joining NETNS_B and CGROUP_B (a socket keeps the
 * network namespace and cgroup it was made in, so B's operations run B's cgroup programs and
 * A's do not). Then blocks of BLOCK_MS of MODE's operations alternate between them, in pairs
 * A,B then B,A, until DURATION_MS: machine noise lasting longer than a block falls on both.
 * Prints {"a": report, "b": report, "pairs": [[rate_a, rate_b], ...]}. MODE: udp or peer.
 */
static int run_pair(char **argv)
{
	const char *mode = argv[2];
	long duration_ms = atol(argv[3]), block_ms = atol(argv[4]);
	struct target ta, tb;
	struct worker w[2] = { 0 };
	uint64_t started, spent[2] = { 0 }, block;
	size_t npairs = 0, cap;
	double (*pairs)[2];
	int err;

	if (duration_ms < 1 || duration_ms > MAX_DURATION_MS || block_ms < 1 ||
	    block_ms > duration_ms)
		return 2;
	if (parse_target(&ta, argv[5], atoi(argv[6]), mode) ||
	    parse_target(&tb, argv[7], atoi(argv[8]), mode))
		return 2;
	if (ta.mode != MODE_UDP && ta.mode != MODE_PEER) {
		fprintf(stderr, "loadgen pair: mode %s: udp or peer only\n", mode);
		return 2;
	}
	w[0].t = &ta;
	w[1].t = &tb;
	err = open_socket(&w[0]);
	if (!err && enter(argv[9], argv[10]))
		return 1;
	if (!err)
		err = open_socket(&w[1]);
	if (err) {
		fprintf(stderr, "loadgen pair: socket: %s\n", strerror(err));
		return 1;
	}
	cap = (size_t)(duration_ms / block_ms) / 2 + 2;
	pairs = calloc(cap, sizeof(*pairs));
	for (int i = 0; i < 2; i++)
		w[i].samples = malloc(SAMPLE_CAP * sizeof(uint32_t));
	block = (uint64_t)block_ms * 1000000ull;
	started = now_ns();
	ta.deadline = tb.deadline = started + (uint64_t)duration_ms * 1000000ull;
	while (npairs < cap) {
		double rate[2];

		for (int k = 0; k < 2; k++) {
			int side = (int)(npairs & 1) ^ k; /* A,B then B,A */
			uint64_t before = w[side].count, from = now_ns();
			uint64_t to = run_for(&w[side], from + block);

			spent[side] += to - from;
			rate[side] = (double)(w[side].count - before) / ((to - from) / 1e9);
		}
		pairs[npairs][0] = rate[0];
		pairs[npairs][1] = rate[1];
		npairs++;
		if (now_ns() >= ta.deadline)
			break;
	}
	printf("{\"a\": ");
	print_report(&w[0], 1, spent[0]);
	printf(", \"b\": ");
	print_report(&w[1], 1, spent[1]);
	printf(", \"block_ms\": %ld, \"pairs\": [", block_ms);
	for (size_t i = 0; i < npairs; i++)
		printf("%s[%.1f, %.1f]", i ? ", " : "", pairs[i][0], pairs[i][1]);
	printf("]}\n");
	for (int i = 0; i < 2; i++) {
		close(w[i].fd);
		free(w[i].samples);
	}
	free(pairs);
	return 0;
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc == 4 && strcmp(argv[1], "server") == 0) {
		int threads = atoi(argv[3]);

		if (threads < 1 || threads > MAX_THREADS)
			return 2;
		return run_server(atoi(argv[2]), threads);
	}
	if (argc == 7 && strcmp(argv[1], "client") == 0) {
		long duration = atol(argv[5]);
		int threads = atoi(argv[6]);

		if (duration < 1 || duration > MAX_DURATION_MS || threads < 1 ||
		    threads > MAX_THREADS)
			return 2;
		return run_client(argv[2], atoi(argv[3]), argv[4], duration, threads);
	}
	if (argc == 11 && strcmp(argv[1], "pair") == 0)
		return run_pair(argv);
	fprintf(stderr, "usage: loadgen server PORT THREADS\n"
			"       loadgen client ADDR PORT cc|rr|udp|peer DURATION_MS THREADS\n"
			"       loadgen pair udp|peer DURATION_MS BLOCK_MS ADDR_A PORT_A ADDR_B PORT_B "
			"NETNS_B CGROUP_B\n");
	return 2;
}
