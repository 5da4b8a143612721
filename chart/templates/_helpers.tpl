{{/* Chart name, possibly overridden. */}}
{{- define "lgmt-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, unless the release name already holds the chart name. */}}
{{- define "lgmt-proxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lgmt-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lgmt-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lgmt-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lgmt-proxy.labels" -}}
helm.sh/chart: {{ include "lgmt-proxy.chart" . }}
{{ include "lgmt-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: proxy
{{- end }}

{{- define "lgmt-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lgmt-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the token, and its key. */}}
{{- define "lgmt-proxy.tokenSecretName" -}}
{{- if .Values.token.existingSecret }}
{{- .Values.token.existingSecret }}
{{- else }}
{{- printf "%s-token" (include "lgmt-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "lgmt-proxy.tokenSecretKey" -}}
{{- if .Values.token.existingSecret }}{{ .Values.token.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{- define "lgmt-proxy.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Seconds the drain may take: SHUTDOWN_DELAY + SHUTDOWN_GRACE, rounded up. */}}
{{- define "lgmt-proxy.drainSeconds" -}}
{{- ceil (addf .Values.config.shutdownDelaySeconds .Values.config.shutdownGraceSeconds) | int }}
{{- end }}

{{- define "lgmt-proxy.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (include "lgmt-proxy.drainSeconds" . | int) 10 }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds | int }}
{{- end }}
{{- end }}

{{/* The port probes and scrapes use: the admin port when it is on. */}}
{{- define "lgmt-proxy.opsPortName" -}}
{{- if .Values.admin.enabled }}admin{{ else }}http{{ end }}
{{- end }}

{{/* A value as YAML read it. Helm reads every number in a values file as a
     float64, which toString prints as 1.329819e+06: a whole number is printed
     as its digits instead (1329819), anything else as toString. What was
     typed is gone by then: an unquoted 0123 arrives as 83 (octal), 0x1F as
     31, 1e3 as 1000; lgmt-proxy.validate refuses what can still be told. */}}
{{- define "lgmt-proxy.str" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . | toString }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* Refuse values that would deploy something broken; one message per problem. */}}
{{- define "lgmt-proxy.validate" -}}
{{- $problems := list }}
{{- if and .Values.token.existingSecret .Values.token.value }}
{{- $problems = append $problems "token: set only one of token.existingSecret and token.value" }}
{{- else if not (or .Values.token.existingSecret .Values.token.value) }}
{{- $problems = append $problems "token: set token.existingSecret (an existing Secret) or token.value (the chart creates the Secret)" }}
{{- end }}
{{- $on := 0 }}
{{- range $signal, $u := .Values.upstreams }}
{{- if $u.url }}
{{- $on = add1 $on }}
{{- if and (not $u.orgId) (not (kindIs "bool" $u.orgId)) }}
{{- $problems = append $problems (printf "upstreams.%s.orgId: required because upstreams.%s.url is set" $signal $signal) }}
{{- end }}
{{- if and (not $.Values.config.allowInsecureUpstream) (not (hasPrefix "https://" $u.url)) }}
{{- $problems = append $problems (printf "upstreams.%s.url: must start with https:// (or set config.allowInsecureUpstream)" $signal) }}
{{- end }}
{{- range $field := list "orgId" "tenantId" }}
{{- $id := index $u $field }}
{{- if kindIs "bool" $id }}
{{- /* yes/no/on/off/true/false: YAML 1.1 booleans (with --skip-schema-validation). */}}
{{- $problems = append $problems (printf "upstreams.%s.%s: YAML reads this unquoted value as the boolean %v, not an id: quote it (%s: \"...\")" $signal $field $id $field) }}
{{- else if kindIs "float64" $id }}
{{- /* 2^53: above it a float64 no longer holds every whole number. */}}
{{- if or (ne (float64 (int64 $id)) $id) (ge $id 9007199254740992.0) (lt $id 0.0) }}
{{- $problems = append $problems (printf "upstreams.%s.%s: %v is not an id Helm can read exactly as a number: quote it (%s: \"...\")" $signal $field $id $field) }}
{{- end }}
{{- end }}
{{- end }}
{{- else if or $u.orgId $u.tenantId }}
{{- $problems = append $problems (printf "upstreams.%s: orgId/tenantId set but url is not" $signal) }}
{{- end }}
{{- end }}
{{- $routesFile := false }}
{{- $clientAuth := .Values.clientAuth.existingSecret }}
{{- range .Values.extraEnv }}
{{- if eq .name "ROUTES_FILE" }}{{ $routesFile = true }}{{ end }}
{{- if eq .name "CLIENT_AUTH_FILE" }}{{ $clientAuth = true }}{{ end }}
{{- end }}
{{- if and $routesFile (gt $on 0) }}
{{- $problems = append $problems "upstreams: leave every url empty when extraEnv sets ROUTES_FILE (the route table replaces them)" }}
{{- else if and (not $routesFile) (eq $on 0) }}
{{- $problems = append $problems "upstreams: at least one signal needs a url and an orgId" }}
{{- end }}
{{- /* Egress through a forward proxy: credentials only from a Secret, each
     variable set in one place, and a NetworkPolicy that lets the pods reach
     the proxy. */}}
{{- $egress := .Values.egress }}
{{- $proxied := or $egress.httpsProxy $egress.httpProxy }}
{{- range $key := list "httpsProxy" "httpProxy" }}
{{- if contains "@" (index $egress $key) }}
{{- $problems = append $problems (printf "egress.%s: no user:password in the URL (it would be a plain environment variable of the Deployment): put them in a Secret and name it in egress.credentialsSecret" $key) }}
{{- end }}
{{- end }}
{{- $egressVars := dict "HTTPS_PROXY" "httpsProxy" "HTTP_PROXY" "httpProxy" "NO_PROXY" "noProxy" "UPSTREAM_PROXY_CREDENTIALS_FILE" "credentialsSecret" }}
{{- range .Values.extraEnv }}
{{- $key := get $egressVars (toString .name) }}
{{- if and $key (index $egress $key) }}
{{- $problems = append $problems (printf "extraEnv: %s is set by egress.%s already; set it in one place" .name $key) }}
{{- end }}
{{- end }}
{{- $np := .Values.networkPolicy }}
{{- if and $np.enabled $np.egress.enabled }}
{{- if and $proxied (not (or $np.egress.proxy.cidrs $np.egress.proxy.namespaceLabels $np.egress.proxy.podLabels)) }}
{{- $problems = append $problems "networkPolicy.egress.proxy: egress.httpsProxy/httpProxy is set: give the proxy's cidrs, or its namespaceLabels/podLabels, or the policy keeps the pods from reaching it" }}
{{- end }}
{{- if and (not $np.egress.httpsCIDRs) (not $proxied) }}
{{- $problems = append $problems "networkPolicy.egress.httpsCIDRs: empty without a forward proxy (egress.httpsProxy): the pods could reach no upstream" }}
{{- end }}
{{- end }}
{{- if and .Values.upstreamCA.configMap .Values.upstreamCA.secret }}
{{- $problems = append $problems "upstreamCA: set only one of upstreamCA.configMap and upstreamCA.secret" }}
{{- end }}
{{- $drain := include "lgmt-proxy.drainSeconds" . | int }}
{{- $tgps := include "lgmt-proxy.terminationGracePeriodSeconds" . | int }}
{{- if le $tgps $drain }}
{{- $problems = append $problems (printf "terminationGracePeriodSeconds: %d must exceed config.shutdownDelaySeconds + config.shutdownGraceSeconds (%d), or the kubelet kills pods mid-drain" $tgps $drain) }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) }}
{{- $problems = append $problems "podDisruptionBudget: set only one of maxUnavailable and minAvailable" }}
{{- end }}
{{- if and .Values.admin.enabled (eq (int .Values.admin.port) (int .Values.config.port)) }}
{{- $problems = append $problems "admin.port: must differ from config.port (or set admin.enabled=false)" }}
{{- end }}
{{- if .Values.otlpGrpc.enabled }}
{{- $grpcPort := int .Values.otlpGrpc.port }}
{{- if or (eq $grpcPort (int .Values.config.port)) (and .Values.admin.enabled (eq $grpcPort (int .Values.admin.port))) }}
{{- $problems = append $problems "otlpGrpc.port: must differ from config.port and admin.port" }}
{{- end }}
{{- if not (index .Values.upstreams "otlp").url }}
{{- $problems = append $problems "otlpGrpc.enabled: OTLP over gRPC is bridged to the otlp upstream; set upstreams.otlp.url and orgId" }}
{{- end }}
{{- end }}
{{- /* With client auth, main-port /metrics names consumers and answers 401
     to an unauthenticated scrape: only the admin port serves it openly. */}}
{{- if and $clientAuth .Values.metrics.serviceMonitor.enabled (not .Values.admin.enabled) }}
{{- $problems = append $problems "metrics.serviceMonitor: with client authentication (clientAuth.existingSecret or CLIENT_AUTH_FILE in extraEnv), /metrics on config.port answers 401 to the scrape; set admin.enabled=true (the default) so the ServiceMonitor scrapes the admin port" }}
{{- end }}
{{- if .Values.metrics.prometheusRule.enabled }}
{{- $anyAlert := false }}
{{- range $name, $alert := .Values.metrics.prometheusRule.alerts }}
{{- if $alert.enabled }}{{ $anyAlert = true }}{{ end }}
{{- end }}
{{- if not $anyAlert }}
{{- $problems = append $problems "metrics.prometheusRule: every alert is disabled (set metrics.prometheusRule.enabled=false instead)" }}
{{- end }}
{{- end }}
{{- if $problems }}
{{- fail (printf "\n  %s" (join "\n  " $problems)) }}
{{- end }}
{{- end }}

{{/* A probe as given, its httpGet moved to the admin port when that is on. */}}
{{- define "lgmt-proxy.probe" -}}
{{- $probe := deepCopy .probe }}
{{- if and $probe.httpGet (eq (toString $probe.httpGet.port) "http") }}
{{- $_ := set $probe.httpGet "port" (include "lgmt-proxy.opsPortName" .root) }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/* The TCP ports of the forward proxies as a JSON list: those of
     egress.httpsProxy and httpProxy (443 or 80 when the URL names none), then
     networkPolicy.egress.proxy.ports. */}}
{{- define "lgmt-proxy.egressProxyPorts" -}}
{{- $ports := list }}
{{- range $url := list .Values.egress.httpsProxy .Values.egress.httpProxy }}
{{- if $url }}
{{- $u := urlParse $url }}
{{- $port := ternary "443" "80" (eq $u.scheme "https") }}
{{- if regexMatch ":[0-9]+$" $u.host }}
{{- $port = regexFind "[0-9]+$" $u.host }}
{{- end }}
{{- $ports = append $ports (int $port) }}
{{- end }}
{{- end }}
{{- range .Values.networkPolicy.egress.proxy.ports }}
{{- $ports = append $ports (int .) }}
{{- end }}
{{- $ports | uniq | toJson }}
{{- end }}
